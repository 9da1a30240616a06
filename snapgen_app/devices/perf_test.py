"""``onnxruntime_perf_test``: build its command line and parse its output into a ComponentProfile.

For devices with a build of ORT's own benchmark tool (e.g. pushed to /data/local/tmp on a phone,
no Python needed). Flags used (perf_test's own): ``-e EP -m times -r RUNS -x THREADS -I`` (generate
inputs) ``-f NAME:VALUE`` (free dimension values) ``-s`` (percentile statistics) and, optionally,
``-p PROFILE`` (per-operator profile). Output lines parsed::

    Session creation time cost: 0.0171 s
    First inference time cost: 1 ms
    Peak working set size: 3502080 bytes
    Min Latency: 0.0011 s / Max / P50 / P90 / P95 / P99 / P999 Latency: ... s
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from snapgen_app.devices.report import ComponentProfile, LatencyStats
from snapgen_app.devices.transport import quote
from snapgen_app.errors import DeviceError

PERF_TEST_EPS: tuple[str, ...] = ("cpu", "xnnpack", "qnn", "nnapi", "coreml", "cuda")
_NUMBER = r"([0-9.eE+-]+)"


def build_command(
    binary: str,
    model: str,
    *,
    ep: str = "cpu",
    runs: int = 10,
    threads: int = 0,
    free_dims: Mapping[str, int] | None = None,
    profile_file: str | None = None,
) -> list[str]:
    """The argument list for one model (``-I`` generated inputs; free dims fixed with ``-f``)."""
    if ep not in PERF_TEST_EPS:
        raise DeviceError(f"onnxruntime_perf_test: unknown --ep {ep!r}; allowed: {list(PERF_TEST_EPS)}")
    args = [binary, "-e", ep, "-m", "times", "-r", str(int(runs)), "-I", "-s"]
    if threads:
        args += ["-x", str(int(threads))]
    for name, value in sorted((free_dims or {}).items()):
        args += ["-f", f"{name}:{int(value)}"]
    if profile_file:
        args += ["-p", profile_file]
    args.append(model)
    return args


def command_line(args: list[str]) -> str:
    """The argument list as one shell command line for the device."""
    return " ".join(quote(a) for a in args)


def _find(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def parse_output(text: str, *, name: str, role: str, file: str, runs: int) -> ComponentProfile:
    """A ComponentProfile from perf_test's stdout; DeviceError when it holds no timing at all."""
    create = _find(rf"Session creation time cost:\s*{_NUMBER}\s*s", text)
    first_ms = _find(rf"First inference time cost:\s*{_NUMBER}\s*ms", text)
    peak = _find(rf"Peak working set size:\s*{_NUMBER}", text)
    stats = {
        key: _find(rf"{key} Latency:\s*{_NUMBER}\s*s", text)
        for key in ("Min", "Max", "P50", "P90", "P95", "P99")
    }
    count = _find(r"Total inference requests:\s*(\d+)", text) or _find(r"Runs:\s*(\d+)", text)
    average_ms = _find(rf"Average inference time cost:\s*{_NUMBER}\s*ms", text)
    if create is None and stats["P50"] is None and average_ms is None:
        raise DeviceError(
            f"onnxruntime_perf_test printed no timings for {file}: {text.strip()[-300:]!r}",
            hint="run the same command by hand on the device to see why",
        )
    latency = None
    if stats["P50"] is not None:
        latency = LatencyStats(
            count=int(count or runs),
            mean_s=(average_ms / 1000.0) if average_ms is not None else float(stats["P50"]),
            min_s=float(stats["Min"] or stats["P50"]),
            max_s=float(stats["Max"] or stats["P50"]),
            p50_s=float(stats["P50"]),
            p90_s=float(stats["P90"] or stats["P50"]),
            p95_s=float(stats["P95"] or stats["P50"]),
            p99_s=float(stats["P99"] or stats["P50"]),
        )
    return ComponentProfile(
        name=name,
        role=role,
        file=file,
        session_create_s=create,
        first_run_s=first_ms / 1000.0 if first_ms is not None else None,
        latency=latency,
        peak_rss_bytes=int(peak) if peak is not None else None,
        source="perf_test",
        partial=latency is None,
        error="" if latency is not None else "no percentile statistics in the output",
    )

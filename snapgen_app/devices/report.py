"""Profile results: per-component timings, the end-to-end estimate, saving, loading, comparing.

A :class:`ProfileResult` holds one :class:`ComponentProfile` per model file (text encoder, UNet
(one call = one denoising step), decoder) plus the device description, model hash, precision and
provider. ``estimated_seconds(steps)`` = text encoder + steps * UNet + decoder, from the p50 warm
latencies. Results are saved as JSON under ``<SNAPGEN_HOME>/profiles/``; unknown keys are an
error when reading one back; two saved runs compare component by component.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from model_store.paths import store_home
from snapgen_app.devices.transport import DeviceInfo
from snapgen_app.errors import DeviceError

PROFILE_FORMAT_VERSION = 1
COMPONENT_ORDER: tuple[str, ...] = ("text_encoder", "unet", "decoder")


def profiles_dir() -> Path:
    """``<SNAPGEN_HOME>/profiles``: saved profile results."""
    return store_home() / "profiles"


def _strict(cls: type, raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DeviceError(f"{where}: expected an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DeviceError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return dict(raw)


@dataclass(frozen=True)
class LatencyStats:
    """Warm latency statistics in seconds over ``count`` timed runs (nearest-rank percentiles, the
    onnxruntime_perf_test convention: sorted[int(n * q)])."""

    count: int
    mean_s: float
    min_s: float
    max_s: float
    p50_s: float
    p90_s: float
    p95_s: float
    p99_s: float

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencyStats | None:
        """Stats of ``samples`` (seconds); None for an empty list."""
        if not samples:
            return None
        ordered = sorted(float(s) for s in samples)
        n = len(ordered)

        def pick(q: float) -> float:
            return ordered[min(n - 1, int(n * q))]

        return cls(n, sum(ordered) / n, ordered[0], ordered[-1], pick(0.5), pick(0.9), pick(0.95), pick(0.99))


@dataclass(frozen=True)
class OpStat:
    """One operator type from ORT's per-node profile: summed kernel time, calls, share of all."""

    op_type: str
    total_ms: float
    count: int
    share: float
    provider: str = ""


@dataclass(frozen=True)
class ComponentProfile:
    """Measurements of one model file on the device.

    ``role``: text_encoder / unet / decoder (a UNet call is one denoising step). ``latencies_s``:
    the raw timed runs; ``thermal``: (seconds since start, latency) pairs of a long run.
    ``peak_rss_bytes``: the runner process's peak resident memory (one process per component, so
    it is this component's peak plus the Python + onnxruntime baseline).
    """

    name: str
    role: str
    file: str
    sha256: str = ""
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    provider_used: str = ""
    session_create_s: float | None = None
    first_run_s: float | None = None
    latency: LatencyStats | None = None
    latencies_s: tuple[float, ...] = ()
    peak_rss_bytes: int | None = None
    top_ops: tuple[OpStat, ...] = ()
    thermal: tuple[tuple[float, float], ...] = ()
    source: str = "runner"
    partial: bool = False
    error: str = ""

    @property
    def warm_s(self) -> float | None:
        """The p50 warm latency, or the first run when no warm run finished."""
        if self.latency is not None:
            return self.latency.p50_s
        return self.first_run_s

    @classmethod
    def from_dict(cls, raw: object) -> ComponentProfile:
        data = _strict(cls, raw, "profile component")
        if data.get("latency") is not None:
            data["latency"] = LatencyStats(**_strict(LatencyStats, data["latency"], "component latency"))
        data["top_ops"] = tuple(
            OpStat(**_strict(OpStat, op, "component top_ops")) for op in data.get("top_ops", ())
        )
        data["latencies_s"] = tuple(data.get("latencies_s", ()))
        data["thermal"] = tuple((float(a), float(b)) for a, b in data.get("thermal", ()))
        return cls(**data)


@dataclass(frozen=True)
class ProfileResult:
    """One profiling run of a model on a device; ``partial`` when some part did not finish."""

    target: str
    device: DeviceInfo
    model_name: str
    bundle_hash: str
    precision: str
    provider: str
    threads: int
    runs: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    components: tuple[ComponentProfile, ...]
    partial: bool = False
    errors: tuple[str, ...] = ()
    runtime: dict[str, str] = field(default_factory=dict)
    created: str = ""
    version: str = ""
    format_version: int = PROFILE_FORMAT_VERSION

    def component(self, role: str) -> ComponentProfile | None:
        """The first component with ``role`` (text_encoder, unet, decoder)."""
        return next((c for c in self.components if c.role == role), None)

    def estimated_seconds(self, steps: int | None = None) -> dict[str, float] | None:
        """Estimated end-to-end seconds for ``steps`` (default: the profiled steps) from p50 warm
        latencies: text encoders + steps * UNet + decoder. None when a component is missing."""
        steps = self.steps if steps is None else steps
        parts: dict[str, float] = {}
        for role in COMPONENT_ORDER:
            found = [c.warm_s for c in self.components if c.role == role]
            if not found or any(v is None for v in found):
                return None
            parts[role] = float(sum(v for v in found if v is not None))
        parts["unet_total"] = parts["unet"] * steps
        parts["total"] = parts["text_encoder"] + parts["unet_total"] + parts["decoder"]
        return parts

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["estimate"] = self.estimated_seconds()
        return data

    @classmethod
    def from_dict(cls, raw: object) -> ProfileResult:
        """Inverse of :meth:`to_dict` (the derived ``estimate`` key is ignored)."""
        if isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if k != "estimate"}
        data = _strict(cls, raw, "profile")
        if data.get("format_version") != PROFILE_FORMAT_VERSION:
            raise DeviceError(
                f"profile format_version {data.get('format_version')!r} is not {PROFILE_FORMAT_VERSION}"
            )
        data["device"] = DeviceInfo.from_dict(data["device"])
        data["components"] = tuple(ComponentProfile.from_dict(c) for c in data["components"])
        data["errors"] = tuple(data.get("errors", ()))
        return cls(**data)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_profile(result: ProfileResult, folder: Path | None = None) -> Path:
    """Write ``result`` as JSON into ``folder`` (default profiles_dir()); returns the file path.

    The name is ``<UTC time>-<model>-<target>-<precision>-<ep>.json`` with unsafe characters replaced."""
    target_dir = folder or profiles_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    raw = f"{stamp}-{result.model_name}-{result.target}-{result.precision}-{result.provider}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    path = target_dir / f"{name}.json"
    counter = 1
    while path.exists():
        path = target_dir / f"{name}-{counter}.json"
        counter += 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(result.to_dict()), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_profile(path: str | Path) -> ProfileResult:
    """Read a saved profile; DeviceError naming the file when it is missing or malformed."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeviceError(
            f"profile {file} does not exist", hint="list saved ones in " + str(profiles_dir())
        ) from None
    except (OSError, ValueError) as exc:  # not JSON, or not UTF-8 (a file re-saved as UTF-16)
        raise DeviceError(f"cannot read profile {file}: {exc}") from exc
    try:
        return ProfileResult.from_dict(raw)
    except (TypeError, KeyError, ValueError) as exc:
        raise DeviceError(f"{file} is not a saved SnapGen profile: {exc}") from exc


# -- text ------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_report(result: ProfileResult) -> str:
    """A plain-text report: device, settings, one row per component, top operators, estimate."""
    lines = [
        f"device    {result.device.summary()}",
        f"runtime   onnxruntime {result.runtime.get('onnxruntime', '?')}, python {result.runtime.get('python', '?')}",
        f"model     {result.model_name} ({result.precision}), bundle {result.bundle_hash[:12]}",
        f"settings  ep={result.provider} threads={result.threads or 'default'} runs={result.runs} "
        f"size={result.width}x{result.height} steps={result.steps} cfg={result.guidance_scale}",
        "",
        f"{'component':<22}{'create ms':>10}{'first ms':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"
        f"{'runs':>6}{'peak MiB':>10}  provider",
    ]
    for c in result.components:
        lat = c.latency
        flag = "  PARTIAL" if c.partial else ""
        lines.append(
            f"{c.name:<22}{_ms(c.session_create_s):>10}{_ms(c.first_run_s):>10}"
            f"{_ms(lat.p50_s if lat else None):>10}{_ms(lat.p90_s if lat else None):>10}"
            f"{_ms(lat.p99_s if lat else None):>10}{(lat.count if lat else 0):>6}{_mib(c.peak_rss_bytes):>10}"
            f"  {c.provider_used}{flag}"
        )
        if c.error:
            lines.append(f"    error: {c.error}")
    for c in result.components:
        if c.top_ops:
            ops = ", ".join(f"{op.op_type} {op.share * 100:.0f}%" for op in c.top_ops[:5])
            lines.append(f"top ops {c.name}: {ops}")
        if c.thermal:
            first, last = c.thermal[0][1], c.thermal[-1][1]
            drift = (last / first - 1) * 100 if first > 0 else 0.0
            span = c.thermal[-1][0]
            lines.append(
                f"thermal {c.name}: {len(c.thermal)} runs over {span:.1f} s, first {first * 1000:.2f} ms -> last {last * 1000:.2f} ms ({drift:+.0f}%)"
            )
    estimate = result.estimated_seconds()
    lines.append("")
    if estimate is not None:
        lines.append(
            f"estimated end-to-end for {result.steps} steps: {estimate['total'] * 1000:.3f} ms "
            f"(text {estimate['text_encoder'] * 1000:.3f} + unet {result.steps} x {estimate['unet'] * 1000:.3f} "
            f"+ decoder {estimate['decoder'] * 1000:.3f})"
        )
    else:
        lines.append("estimated end-to-end: not available (a component did not finish)")
    if result.partial:
        lines.append("PARTIAL RESULT: " + "; ".join(result.errors or ("some runs did not finish",)))
    return "\n".join(lines)


@dataclass(frozen=True)
class ComparisonRow:
    """One component (or the estimate) in two runs: p50 seconds and the ratio b / a."""

    name: str
    a_s: float | None
    b_s: float | None

    @property
    def ratio(self) -> float | None:
        if self.a_s is None or self.b_s is None or self.a_s <= 0:
            return None
        return self.b_s / self.a_s


def compare_profiles(a: ProfileResult, b: ProfileResult) -> list[ComparisonRow]:
    """Rows for every component name in either run (p50 warm latency) plus ``total`` (estimate at
    run a's step count, so both use the same steps)."""
    names = list(dict.fromkeys([c.name for c in a.components] + [c.name for c in b.components]))
    rows = []
    for name in names:
        ca = next((c for c in a.components if c.name == name), None)
        cb = next((c for c in b.components if c.name == name), None)
        rows.append(ComparisonRow(name, ca.warm_s if ca else None, cb.warm_s if cb else None))
    ea, eb = a.estimated_seconds(a.steps), b.estimated_seconds(a.steps)
    rows.append(
        ComparisonRow(f"total ({a.steps} steps)", ea["total"] if ea else None, eb["total"] if eb else None)
    )
    return rows


def format_comparison(a: ProfileResult, b: ProfileResult) -> str:
    """Text table of :func:`compare_profiles` with both runs' device/precision/provider."""
    lines = [
        f"A: {a.target} {a.device.model} {a.model_name} {a.precision} {a.provider} ({a.created})",
        f"B: {b.target} {b.device.model} {b.model_name} {b.precision} {b.provider} ({b.created})",
        "",
        f"{'component':<24}{'A p50 ms':>10}{'B p50 ms':>10}{'B/A':>8}",
    ]
    for row in compare_profiles(a, b):
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"{row.name:<24}{_ms(row.a_s):>10}{_ms(row.b_s):>10}{ratio:>8}")
    if a.bundle_hash != b.bundle_hash:
        lines.append("note: the two runs used different bundles (hashes differ)")
    return "\n".join(lines)

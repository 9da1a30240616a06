"""The on-device runner: ONE self-contained file pushed to a phone or board and run there.

It needs only the Python standard library, numpy and onnxruntime (it must not import snapgen_app:
the device has none of it). Type hints are strings (``from __future__ import annotations``), so
Python 3.7+ runs it; numpy and onnxruntime are passed around as modules (``np``, ``ort``).
The host writes a request JSON next to it and runs::

    python3 runner.py check                       # versions, providers, cpu count, free of failures
    python3 runner.py profile REQUEST.json        # time one or more ONNX models
    python3 runner.py generate REQUEST.json       # text encoder(s) -> Euler loop -> decoder

Each mode prints exactly ONE JSON object on stdout (the last line) and exits 0 when it ran; a
missing module or a failure still prints one JSON object (``"ok": false``, ``"error"``, what to
install) and exits 3 (missing module) or 1. A profile that stops early (a model fails, the request's
deadline passes) keeps what it measured and says ``"partial": true``; it also rewrites
``<request>.partial.json`` after every timed run so that the host can pull it after a hard timeout
or a lost connection.

Conventions copied from the host pipeline (snapgen_app.pipeline), kept byte-compatible so the same
seed gives the same image on the host and on a device with the same provider:
flow times t = shift*s / (1 + (shift-1)*s) over s = linspace(1, 0, steps+1); noise per image from
numpy PCG64(seed).standard_normal((C, h, w), float32); Euler x <- x + (t_next - t) * v; the UNet
sees timestep = t * 1000 float32 [B]; CFG batches [uncond, cond].
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from typing import Any

RUNNER_VERSION = 1
EXIT_MISSING = 3
EP_NAMES = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def emit(payload: dict[str, Any]) -> None:
    """Print the one result line (stdout) and flush."""
    sys.stdout.write(json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str) + "\n")
    sys.stdout.flush()


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux/Android, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # not on a POSIX system
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def import_runtime() -> tuple[Any, Any]:
    """(numpy, onnxruntime) or exit with a JSON that names what to install."""
    missing = []
    try:
        import numpy
    except ImportError:
        numpy = None
        missing.append("numpy")
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
        missing.append("onnxruntime")
    if missing:
        emit(
            {
                "ok": False,
                "runner_version": RUNNER_VERSION,
                "error": "missing Python module(s): " + ", ".join(missing),
                "missing": missing,
                "python": sys.version.split()[0],
                "python_executable": sys.executable,
            }
        )
        sys.exit(EXIT_MISSING)
    return numpy, onnxruntime


def device_facts(ort: Any) -> dict[str, Any]:
    """What the device says about itself, from inside the runner."""
    return {
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "providers": list(ort.get_available_providers()),
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "cpu_count": os.cpu_count(),
    }


def session_options(ort: Any, threads: int, profile_prefix: str | None = None) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def provider_list(ort: Any, ep: str) -> list[str]:
    """[wanted, CPU] after checking that this onnxruntime has ``ep``; raises RuntimeError otherwise."""
    name = EP_NAMES.get(ep, ep)
    available = ort.get_available_providers()
    if name not in available:
        raise RuntimeError(f"provider {name} is not available in this onnxruntime (it has {available})")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def make_session(
    ort: Any, path: str, ep: str, threads: int, profile_prefix: str | None = None
) -> tuple[Any, float]:
    start = time.perf_counter()
    session = ort.InferenceSession(
        path, sess_options=session_options(ort, threads, profile_prefix), providers=provider_list(ort, ep)
    )
    return session, time.perf_counter() - start


def make_feeds(np: Any, session: Any, specs: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Inputs for every graph input. ``specs[name] = {"shape": [...], "fill": "random"|"zeros"|"ones"|
    "range"|number}``; the dtype is the graph's. Random values are seeded, ids stay in range 0..99."""
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in specs:
            raise RuntimeError(f"no shape given for input {spec.name!r} (graph shape {spec.shape})")
        shape = [int(d) for d in specs[spec.name]["shape"]]
        fill = specs[spec.name].get("fill", "random")
        dtype = NUMPY_TYPES.get(spec.type, "float32")
        if fill == "zeros":
            value = np.zeros(shape, dtype)
        elif fill == "ones":
            value = np.ones(shape, dtype)
        elif isinstance(fill, (int, float)):
            value = np.full(shape, fill, dtype)
        elif dtype.startswith("int"):
            value = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        feeds[spec.name] = value
    return feeds


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (the perf_test convention: index int(n*q))."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(len(sorted_values) * q))
    return sorted_values[index]


def summarize_profile(path: str, top: int) -> dict[str, Any]:
    """Top operator types by total kernel time from an ORT profile JSON (a list of trace events)."""
    with open(path, encoding="utf-8") as handle:
        events = json.load(handle)
    by_op = {}
    total = 0.0
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        duration = float(event.get("dur", 0.0))
        entry = by_op.setdefault(
            op, {"op_type": op, "total_us": 0.0, "count": 0, "provider": args.get("provider", "")}
        )
        entry["total_us"] += duration
        entry["count"] += 1
        total += duration
    ops = sorted(by_op.values(), key=lambda e: -e["total_us"])
    for entry in ops:
        entry["share"] = entry["total_us"] / total if total > 0 else 0.0
    return {"total_us": total, "top_ops": ops[: int(top)], "events": len(events)}


class PartialWriter:
    """Rewrites ``<request>.partial.json`` at most every ``interval`` seconds (and on demand)."""

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.last = 0.0

    def write(self, payload: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, allow_nan=False, default=str)
        os.replace(tmp, self.path)


def profile_model(
    np: Any,
    ort: Any,
    model: dict[str, Any],
    request: dict[str, Any],
    deadline: float | None,
    result: dict[str, Any],
    writer: PartialWriter,
) -> dict[str, Any]:
    """Time one model; fills and returns a component dict (also kept in ``result`` for partials)."""
    component = {"name": model["name"], "file": model["path"], "partial": False, "latencies_s": []}
    result["components"].append(component)
    ep, threads = request.get("ep", "cpu"), request.get("threads", 0)
    session, created = make_session(ort, model["path"], ep, threads)
    component["session_create_s"] = created
    component["provider_used"] = session.get_providers()[0]
    feeds = make_feeds(np, session, model["inputs"], request.get("seed", 0))
    component["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    start = time.perf_counter()
    session.run(None, feeds)
    component["first_run_s"] = time.perf_counter() - start
    for _ in range(max(0, int(request.get("warmup", 1)) - 1)):
        session.run(None, feeds)
    runs = int(request.get("runs", 10))
    thermal = float(request.get("thermal_seconds", 0) or 0)
    thermal_trace = []
    began = time.monotonic()
    done = 0
    while done < runs or (thermal > 0 and time.monotonic() - began < thermal):
        if deadline is not None and time.monotonic() > deadline:
            component["partial"] = True
            component["stopped"] = f"deadline reached after {done} of {runs} timed runs"
            break
        start = time.perf_counter()
        session.run(None, feeds)
        latency = time.perf_counter() - start
        done += 1
        if done <= runs:
            component["latencies_s"].append(latency)
        if thermal > 0:
            thermal_trace.append([round(time.monotonic() - began, 4), latency])
            component["thermal"] = thermal_trace
        component["peak_rss_bytes"] = peak_rss_bytes()
        writer.write(result)
    component["peak_rss_bytes"] = peak_rss_bytes()
    del session
    profile_runs = int(request.get("op_profile_runs", 1))
    if profile_runs > 0 and not component["partial"]:
        # A separate profiled session: profiling slows runs down, so it never touches the timings.
        prefix = os.path.join(request.get("workdir", "."), "ort_profile_" + model["name"])
        session, _ = make_session(ort, model["path"], ep, threads, profile_prefix=prefix)
        for _ in range(profile_runs + 1):  # the first run includes allocations; ORT records it too
            session.run(None, feeds)
        trace = session.end_profiling()
        try:
            component["op_profile"] = summarize_profile(trace, request.get("top_ops", 10))
        finally:  # a few MB a run, a new name each time: it would fill the device's work folder
            with contextlib.suppress(OSError):
                os.remove(trace)
        del session
    return component


def run_profile(request_path: str) -> int:
    np, ort = import_runtime()
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    result = {
        "ok": True,
        "mode": "profile",
        "runner_version": RUNNER_VERSION,
        "partial": False,
        "device": device_facts(ort),
        "components": [],
        "errors": [],
    }
    writer = PartialWriter(request_path + ".partial.json")
    deadline_s = request.get("deadline_s")
    deadline = time.monotonic() + float(deadline_s) if deadline_s else None
    for model in request["models"]:
        try:
            profile_model(np, ort, model, request, deadline, result, writer)
        except Exception as exc:  # keep what was measured; the host labels the result partial
            result["partial"] = True
            result["errors"].append(f"{model['name']}: {type(exc).__name__}: {str(exc).strip()[:500]}")
            if result["components"] and result["components"][-1]["name"] == model["name"]:
                result["components"][-1]["partial"] = True
                result["components"][-1]["error"] = result["errors"][-1]
        if any(c.get("partial") for c in result["components"]):
            result["partial"] = True
    result["peak_rss_bytes"] = peak_rss_bytes()
    writer.write(result, force=True)
    emit(result)
    return 0


# -- generate --------------------------------------------------------------------------------------


def flow_sigmas(np: Any, steps: int, shift: float) -> Any:
    t = np.linspace(1.0, 0.0, int(steps) + 1, dtype=np.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def prepared(np: Any, session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    """Cast feeds to the graph's input dtypes (an fp16-IO export takes our float32 arrays)."""
    out = {}
    for spec in session.get_inputs():
        if spec.name in feeds:
            value = np.asarray(feeds[spec.name])
            dtype = NUMPY_TYPES.get(spec.type)
            out[spec.name] = value.astype(dtype) if dtype and value.dtype != dtype else value
    return out


def run_generate(request_path: str) -> int:
    np, ort = import_runtime()
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    started = time.perf_counter()
    ep, threads = request.get("ep", "cpu"), request.get("threads", 0)
    timings = {}
    load_start = time.perf_counter()
    encoders = [make_session(ort, enc["path"], ep, threads)[0] for enc in request["text_encoders"]]
    unet, _ = make_session(ort, request["unet"], ep, threads)
    decoder, _ = make_session(ort, request["decoder"], ep, threads)
    timings["load"] = time.perf_counter() - load_start

    start = time.perf_counter()
    tokens, pooled = [], []
    # zip(strict=) needs Python 3.10; a board may run an older Python. The lists have equal length.
    for session, enc in zip(encoders, request["text_encoders"]):  # noqa: B905
        feeds = {
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
        }
        values = session.run(["tokens", "pooled"], prepared(np, session, feeds))
        out = {"tokens": values[0], "pooled": values[1]}
        tokens.append(np.asarray(out["tokens"]))
        pooled.append(np.asarray(out["pooled"]))
    tokens = np.concatenate(tokens, axis=1).astype(np.float32, copy=False)
    pooled = np.concatenate(pooled, axis=-1).astype(np.float32, copy=False)
    timings["text_encoder"] = time.perf_counter() - start

    seeds = [int(s) for s in request["seeds"]]
    batch = len(seeds)
    guidance = float(request.get("guidance_scale", 1.0))
    use_cfg = guidance > 1.0
    # Row 0 is the prompt; with CFG row 1 is the null condition (empty prompt or zeros).
    cond_t, cond_p = tokens[[0] * batch], pooled[[0] * batch]
    if use_cfg:
        if request.get("null_condition", "empty_prompt") == "zeros":
            un_t, un_p = np.zeros_like(cond_t), np.zeros_like(cond_p)
        else:
            un_t, un_p = tokens[[1] * batch], pooled[[1] * batch]
        cond_t, cond_p = np.concatenate([un_t, cond_t], 0), np.concatenate([un_p, cond_p], 0)
    wants_pooled = "pooled_text" in [i.name for i in unet.get_inputs()]
    factor = int(request["vae_scale_factor"])
    channels = int(request["latent_channels"])
    h, w = int(request["height"]) // factor, int(request["width"]) // factor
    x = np.stack(
        [
            np.random.Generator(np.random.PCG64(s)).standard_normal((channels, h, w), dtype=np.float32)
            for s in seeds
        ]
    )
    sigmas = flow_sigmas(np, int(request["steps"]), float(request["shift"]))
    step_times = []
    start = time.perf_counter()
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        step_start = time.perf_counter()
        sample = np.concatenate([x, x], 0) if use_cfg else x
        feeds = {
            "sample": sample,
            "timestep": np.full((sample.shape[0],), t * 1000.0, dtype=np.float32),
            "encoder_hidden_states": cond_t,
        }
        if wants_pooled:
            feeds["pooled_text"] = cond_p
        v = np.asarray(unet.run(["velocity"], prepared(np, unet, feeds))[0]).astype(np.float32, copy=False)
        if use_cfg:
            v = v[:batch] + np.float32(guidance) * (v[batch:] - v[:batch])
        x = x + np.float32(t_next - t) * v
        step_times.append(time.perf_counter() - step_start)
    timings["unet"] = time.perf_counter() - start
    timings["unet_per_step"] = timings["unet"] / max(1, len(step_times))

    start = time.perf_counter()
    image = np.asarray(decoder.run(["image"], prepared(np, decoder, {"latent": x}))[0]).astype(np.float32)
    timings["decoder"] = time.perf_counter() - start
    if not np.all(np.isfinite(image)):
        raise RuntimeError("the decoder produced NaN or infinite pixels; try the fp32 precision")
    pixels = np.rint(np.clip((image + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8).transpose(0, 2, 3, 1)
    out_path = request["output"]
    np.save(out_path, np.ascontiguousarray(pixels), allow_pickle=False)
    timings["total"] = time.perf_counter() - started
    emit(
        {
            "ok": True,
            "mode": "generate",
            "runner_version": RUNNER_VERSION,
            "partial": False,
            "device": device_facts(ort),
            "provider_used": unet.get_providers()[0],
            "timings": timings,
            "step_times_s": step_times,
            "output": out_path,
            "shape": list(pixels.shape),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    return 0


def run_check() -> int:
    np, ort = import_runtime()
    emit(
        {
            "ok": True,
            "mode": "check",
            "runner_version": RUNNER_VERSION,
            "numpy": np.__version__,
            "device": device_facts(ort),
        }
    )
    return 0


def main(argv: list[str]) -> int:
    modes = {"check": run_check, "profile": run_profile, "generate": run_generate}
    if not argv or argv[0] not in modes or (argv[0] != "check" and len(argv) != 2):
        emit({"ok": False, "error": "usage: runner.py check | profile REQUEST.json | generate REQUEST.json"})
        return 2
    try:
        return modes[argv[0]](*argv[1:])
    except SystemExit:
        raise
    except BaseException as exc:  # one JSON line even for a crash, so the host can say what happened
        emit({"ok": False, "mode": argv[0], "error": f"{type(exc).__name__}: {str(exc).strip()[:1000]}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

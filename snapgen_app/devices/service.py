"""The device API that ``snapgen devices`` and the UI's device page call.

- :func:`list_devices` -> adb devices (any state) and saved SSH targets;
- :func:`add_target` / :func:`saved_targets` / :func:`forget_target`: connection settings per target
  (SSH key, remote Python, remote folder), kept in ``<SNAPGEN_HOME>/devices/targets.json``;
- :func:`profile(request, on_event, cancel) <profile>` -> :class:`ProfileResult`: pushes the
  bundle's models (once; reused when the device's hash matches) and the runner, times each
  component in its own runner process (text encoder, UNet = one step, decoder), saves the result;
- :func:`generate_on_device(request, target, ...) <generate_on_device>` -> GenerationResult: the
  whole text-to-image loop runs on the device; the PNG comes back with the device's timings in
  its metadata.

Events (``snapgen_app.progress.Event``) use stage ``device-profile`` / ``device-generate``:
``started``, ``progress`` (step = component or file index), ``log``, then ``finished``,
``error`` or ``cancelled``. Cancel is checked between files and components and polled (0.1 s)
while a remote command runs. Failures keep what was measured: the result says ``partial``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from model_store import bundle as store_bundle
from model_store.errors import StoreError
from model_store.paths import store_home
from snapgen_app import __version__
from snapgen_app.api import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    MIN_STEPS,
    GenerationRequest,
    GenerationResult,
)
from snapgen_app.devices import runner as runner_module
from snapgen_app.devices.perf_test import build_command, command_line, parse_output
from snapgen_app.devices.prepare import LocalFile, convert_to_ort, local_file, make_fixed_shape, sync_files
from snapgen_app.devices.report import ComponentProfile, LatencyStats, OpStat, ProfileResult, save_profile
from snapgen_app.devices.transport import DeviceInfo, TargetSpec, Transport, parse_target, quote
from snapgen_app.errors import BundleError, ConfigError, DeviceError, UsageError
from snapgen_app.pipeline.text_to_image import size_stride
from snapgen_app.progress import CancelToken, Event, EventCallback, reporting_outcome
from snapgen_app.progress import emit as _emit

log = logging.getLogger(__name__)

PROFILE_STAGE = "device-profile"
GENERATE_STAGE = "device-generate"
EPS: tuple[str, ...] = tuple(runner_module.EP_NAMES)
RUNNER_NAME = "runner.py"
AUTO_PRECISION: tuple[str, ...] = ("int8", "fp32", "fp16")  # device CPUs: int8 first, as on the host
DEFAULT_SSH_DIR = "snapgen-device"
INSTALL_PYTHON = {
    "adb": "adb shell cannot use Termux's Python; run Termux's sshd and use ssh:USER@PHONE:8022, "
    "or pass --perf-test with an onnxruntime_perf_test build pushed to the phone",
    "ssh": "install Python 3 there: Termux `pkg install python`, Debian/Raspberry Pi OS `sudo apt install python3`",
}
INSTALL_MODULES = (
    "Termux: `pkg install python-numpy python-onnxruntime` (pip has no onnxruntime wheel for Termux); "
    "Linux board (aarch64/x86-64): `python3 -m pip install onnxruntime numpy`"
)


# -- targets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach and use a target. ``remote_dir`` None: /data/local/tmp/snapgen (adb) or
    ~/snapgen-device (SSH). ``remote_python``: the device's Python with numpy and onnxruntime."""

    ssh_key: str | None = None
    remote_python: str = "python3"
    remote_dir: str | None = None
    adb: str | None = None
    connect_timeout: float = 15.0

    def merged(self, explicit: ConnectOptions | None) -> ConnectOptions:
        """These saved settings overridden by every field of ``explicit`` that differs from the default."""
        if explicit is None:
            return self
        default = ConnectOptions()
        changes = {
            f.name: getattr(explicit, f.name)
            for f in dataclasses.fields(self)
            if getattr(explicit, f.name) != getattr(default, f.name)
        }
        return dataclasses.replace(self, **changes)


def _targets_path() -> Path:
    return store_home() / "devices" / "targets.json"


def saved_targets() -> dict[str, ConnectOptions]:
    """Targets saved with :func:`add_target` (canonical target text -> options)."""
    path = _targets_path()
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(ConnectOptions)}
        result = {}
        for target, values in raw.get("targets", {}).items():
            unknown = sorted(set(values) - names)
            if unknown:
                raise DeviceError(
                    f"{path}: target {target} has unknown keys {unknown}; allowed: {sorted(names)}"
                )
            result[target] = ConnectOptions(**values)
        return result
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise DeviceError(f"cannot read {path}: {exc}", hint="fix or delete the file") from exc


def _write_targets(targets: dict[str, ConnectOptions]) -> None:
    path = _targets_path()
    payload = {"format_version": 1, "targets": {k: dataclasses.asdict(v) for k, v in sorted(targets.items())}}
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:  # a full disk or a read-only data folder: the saved targets are unchanged
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DeviceError(
            f"cannot save the device list {path}: {exc.strerror or exc}",
            hint="free some disk space or check that the data folder is writable",
        ) from None


def add_target(target: str, options: ConnectOptions) -> str:
    """Remember ``options`` for ``target`` (used by profile and generate); returns the canonical text."""
    spec = parse_target(target)
    if options.ssh_key and not Path(options.ssh_key).expanduser().is_file():
        raise UsageError(f"--ssh-key {options.ssh_key}: no such file")
    targets = saved_targets()
    targets[spec.text] = options
    _write_targets(targets)
    return spec.text


def forget_target(target: str) -> bool:
    """Drop a saved target; False when it was not saved."""
    spec = parse_target(target)
    targets = saved_targets()
    found = targets.pop(spec.text, None) is not None
    if found:
        _write_targets(targets)
    return found


def options_for(target: str, explicit: ConnectOptions | None = None) -> ConnectOptions:
    """Saved settings of ``target`` overridden by ``explicit``."""
    spec = parse_target(target)
    return saved_targets().get(spec.text, ConnectOptions()).merged(explicit)


def open_transport(target: str, options: ConnectOptions | None = None) -> Transport:
    """A transport for ``adb:SERIAL`` or ``ssh:USER@HOST[:PORT]`` (not yet connected)."""
    spec = parse_target(target)
    opts = options_for(target, options)
    if spec.kind == "adb":
        from snapgen_app.devices.adb import DEFAULT_WORKDIR, AdbTransport

        return AdbTransport(spec.address, adb=opts.adb, workdir=opts.remote_dir or DEFAULT_WORKDIR)
    from snapgen_app.devices.ssh import SshTransport

    key = str(Path(opts.ssh_key).expanduser()) if opts.ssh_key else None
    return SshTransport(
        spec, key_path=key, workdir=opts.remote_dir or DEFAULT_SSH_DIR, connect_timeout=opts.connect_timeout
    )


def list_devices(adb: str | None = None) -> list[DeviceInfo]:
    """adb devices (any state; none when adb is not installed) and saved SSH targets (state "saved")."""
    from snapgen_app.devices.adb import list_adb_devices

    devices: list[DeviceInfo] = []
    try:
        devices.extend(list_adb_devices(adb))
    except DeviceError as exc:
        log.info("adb devices skipped: %s", exc)
    listed = {d.target for d in devices}
    for target in saved_targets():
        if target not in listed:
            kind: Any = parse_target(target).kind
            devices.append(DeviceInfo(target=target, kind=kind, state="saved"))
    return devices


# -- shared helpers --------------------------------------------------------------------------------


def _cancel_check(cancel: CancelToken | None) -> Callable[[], bool] | None:
    return (lambda: cancel.cancelled) if cancel is not None else None


@dataclass
class _Model:
    root: Path
    name: str
    manifest: store_bundle.BundleManifest
    precision: str
    bundle_hash: str


def _load_model(model: str, precision: str) -> _Model:
    from snapgen_app.service import resolve_model  # the generation service owns model resolution

    root, name = resolve_model(model)
    try:
        manifest = store_bundle.read_manifest(root)
        if precision == "auto":
            installed = store_bundle.installed_precisions(root, manifest)
            order = [p for p in AUTO_PRECISION if p in manifest.precisions]
            precision = next((p for p in order if p in installed), order[0])
        elif precision not in manifest.precisions:
            raise ConfigError(
                "precision",
                f"model {manifest.name!r} has no {precision!r} variant",
                allowed=list(manifest.precisions),
            )
        manifest = store_bundle.verify_or_raise(root, precisions=[precision])
    except StoreError as exc:
        raise BundleError(exc.message, hint=exc.hint) from exc
    bundle_hash = hashlib.sha256((root / store_bundle.MANIFEST_NAME).read_bytes()).hexdigest()
    return _Model(root, name, manifest, precision, bundle_hash)


def _model_files(model: _Model) -> list[LocalFile]:
    """The variant's ONNX files and their external-data companions (no tokenizers: the host tokenizes)."""
    skip = set(model.manifest.tokenizer_files) | {model.manifest.model_card}
    names = [n for n in model.manifest.variant_files(model.precision) if n not in skip]
    return [local_file(n, model.root / n, model.manifest.files[n].sha256) for n in names]


def _runner_file() -> LocalFile:
    # The source file, also in a frozen build (where __file__ may name a .pyc; the spec ships runner.py).
    return local_file(RUNNER_NAME, Path(runner_module.__file__).with_name(RUNNER_NAME))


def _parse_runner_output(target: str, stdout: str, stderr: str) -> dict[str, Any]:
    """The runner's one JSON line (the last line that parses as an object)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(payload, dict):
                return payload
    raise DeviceError(
        f"{target}: the runner printed no result: {(stderr or stdout).strip()[-400:]!r}",
        hint="run `snapgen devices profile` with -v, or run runner.py check on the device by hand",
    )


def check_device_runtime(transport: Transport, python: str, runner_path: str) -> dict[str, Any]:
    """Python, numpy, onnxruntime and its providers on the device, or DeviceError saying what to install."""
    result = transport.run(
        f"cd {quote(transport.workdir)} && {quote(python)} {quote(runner_path)} check", timeout=120
    )
    said = (result.stderr + result.stdout).lower()
    if result.returncode in (126, 127) or (not result.ok and ("not found" in said or "no such file" in said)):
        raise DeviceError(
            f"{transport.target}: Python ({python}) is not available on the device: {result.stderr.strip()[:200]}",
            hint=INSTALL_PYTHON[transport.kind],
        )
    payload = _parse_runner_output(transport.target, result.stdout, result.stderr)
    if not payload.get("ok"):
        if payload.get("missing"):
            raise DeviceError(
                f"{transport.target}: the device's Python {payload.get('python', '')} lacks {', '.join(payload['missing'])}",
                hint=INSTALL_MODULES,
            )
        raise DeviceError(f"{transport.target}: runner check failed: {payload.get('error', '?')}")
    return payload


def _require_provider(transport: Transport, facts: dict[str, Any], ep: str) -> None:
    wanted = runner_module.EP_NAMES[ep]
    providers = facts.get("device", {}).get("providers", [])
    if wanted not in providers:
        raise DeviceError(
            f"{transport.target}: provider {wanted} (--ep {ep}) is not available in the device's onnxruntime "
            f"{facts.get('device', {}).get('onnxruntime', '')} (it has {providers})",
            hint="use an onnxruntime build with that provider on the device (e.g. onnxruntime-qnn for QNN, "
            "a perf_test build with XNNPACK), or profile with --ep cpu",
        )


# -- profile ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileRequest:
    """What to profile where. ``model``: installed name or bundle folder. ``runs``: timed runs per
    component after ``warmup`` runs. Unset steps/size/guidance take the bundle's defaults.
    ``perf_test``: path ON THE DEVICE of onnxruntime_perf_test (then no Python is needed).
    ``thermal_seconds`` > 0 keeps the UNet running that long and records latency over time.
    ``timeout_s``: limit per component (the runner stops itself a little earlier and reports partial)."""

    model: str
    target: str
    ep: str = "cpu"
    threads: int = 0
    runs: int = 10
    warmup: int = 1
    precision: str = "auto"
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    ort_format: bool = False
    fixed_shapes: bool = False
    perf_test: str | None = None
    op_profile_runs: int = 1
    thermal_seconds: float = 0.0
    timeout_s: float = 600.0
    connect: ConnectOptions | None = None
    save: bool = True
    components: tuple[str, ...] = ("text_encoder", "unet", "decoder")

    def __post_init__(self) -> None:
        parse_target(self.target)
        if self.ep not in EPS:
            raise ConfigError("ep", f"{self.ep!r} is not known", allowed=list(EPS))
        for name, low, high in (
            ("runs", 1, 100000),
            ("warmup", 1, 1000),
            ("threads", 0, 256),
            ("op_profile_runs", 0, 100),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(name, f"{value} is out of range", allowed=f"{low}-{high}")
        if self.precision not in ("auto", *store_bundle.PRECISIONS):
            raise ConfigError("precision", repr(self.precision), allowed=["auto", *store_bundle.PRECISIONS])
        if self.thermal_seconds < 0 or self.timeout_s <= 0:
            raise ConfigError("thermal_seconds/timeout_s", "must be >= 0 / > 0")
        # The same ranges as a generation (None: the model's default)
        for name, low, high in (
            ("steps", MIN_STEPS, MAX_STEPS),
            ("width", MIN_SIZE, MAX_SIZE),
            ("height", MIN_SIZE, MAX_SIZE),
        ):
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(name, f"{value} is out of range", allowed=f"{low}-{high}")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise ConfigError(
                "guidance_scale", f"{self.guidance_scale} is out of range", allowed=f"0-{MAX_GUIDANCE:g}"
            )
        unknown = [c for c in self.components if c not in ("text_encoder", "unet", "decoder")]
        if unknown or not self.components:
            raise ConfigError(
                "components", f"{unknown or 'empty'}", allowed=["text_encoder", "unet", "decoder"]
            )


@dataclass
class _Plan:
    """One component to time: role, display name, local file, input specs for the runner."""

    role: str
    name: str
    file: LocalFile
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _plans(model: _Model, request: ProfileRequest) -> tuple[list[_Plan], dict[str, Any]]:
    manifest = model.manifest
    defaults = manifest.defaults
    steps = defaults.steps if request.steps is None else request.steps
    width = defaults.width if request.width is None else request.width
    height = defaults.height if request.height is None else request.height
    guidance = defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale
    factor, channels = manifest.model.vae_scale_factor, manifest.model.latent_channels
    stride = size_stride(manifest)  # what the UNet can halve down to, checked before anything is pushed
    if width % stride or height % stride:
        raise ConfigError("width/height", f"{width}x{height} is not a multiple of {stride}")
    h, w = height // factor, width // factor
    cfg = guidance > 1.0
    batch = 2 if cfg else 1
    specs = manifest.model.text_encoders
    variant = manifest.variant(model.precision)
    encoder_files = list(variant.text_encoder) or [s.file for s in specs]
    by_name = {f.name: f for f in _model_files(model)}
    plans: list[_Plan] = []
    for index, (spec, file) in enumerate(zip(specs, encoder_files, strict=True)):
        shape = [batch, spec.max_length]
        name = "text_encoder" if len(specs) == 1 else f"text_encoder_{index}"
        plans.append(
            _Plan(
                "text_encoder",
                name,
                by_name[file],
                {
                    "input_ids": {"shape": shape, "fill": 1},
                    "attention_mask": {"shape": shape, "fill": "ones"},
                },
            )
        )
    tokens = sum(s.max_length for s in specs)
    context = specs[0].hidden_size if specs else 1
    pooled = sum(s.pooled_size for s in specs)
    plans.append(
        _Plan(
            "unet",
            "unet",
            by_name[variant.unet],
            {
                "sample": {"shape": [batch, channels, h, w]},
                "timestep": {"shape": [batch], "fill": 500.0},
                "encoder_hidden_states": {"shape": [batch, tokens, context]},
                "pooled_text": {"shape": [batch, pooled]},
            },
        )
    )
    plans.append(
        _Plan("decoder", "decoder", by_name[variant.decoder], {"latent": {"shape": [1, channels, h, w]}})
    )
    plans = [p for p in plans if p.role in request.components]
    settings = {"steps": steps, "width": width, "height": height, "guidance_scale": guidance}
    return plans, settings


def _prepare_plan_file(plan: _Plan, request: ProfileRequest) -> LocalFile:
    """The file to push for ``plan``: the original, a fixed-shape copy, and/or its ORT format."""
    file = plan.file
    if request.fixed_shapes:
        fixed = make_fixed_shape(file.path, {k: v["shape"] for k, v in plan.inputs.items()}, file.sha256)
        file = local_file(f"fixed/{plan.name}/{fixed.name}", fixed)
    if request.ort_format:
        converted = convert_to_ort(file.path, file.sha256)
        file = local_file(f"ort/{file.sha256[:16]}/{converted.name}", converted)
    return file


def _component_from_runner(plan: _Plan, file: LocalFile, raw: dict[str, Any]) -> ComponentProfile:
    ops = raw.get("op_profile", {}).get("top_ops", [])
    return ComponentProfile(
        name=plan.name,
        role=plan.role,
        file=file.name,
        sha256=file.sha256,
        input_shapes={k: list(v) for k, v in raw.get("input_shapes", {}).items()},
        provider_used=raw.get("provider_used", ""),
        session_create_s=raw.get("session_create_s"),
        first_run_s=raw.get("first_run_s"),
        latency=LatencyStats.from_samples(raw.get("latencies_s", [])),
        latencies_s=tuple(raw.get("latencies_s", [])),
        peak_rss_bytes=raw.get("peak_rss_bytes"),
        top_ops=tuple(
            OpStat(
                op["op_type"],
                op["total_us"] / 1000.0,
                int(op["count"]),
                float(op["share"]),
                op.get("provider", ""),
            )
            for op in ops
        ),
        thermal=tuple((float(a), float(b)) for a, b in raw.get("thermal", [])),
        partial=bool(raw.get("partial")),
        error=str(raw.get("error", raw.get("stopped", ""))),
    )


def _relative(transport: Transport, remote: str) -> str:
    """``remote`` relative to the work folder: the runner runs there, and relative paths in its
    request keep working when the device folder is reached under another name."""
    prefix = transport.workdir.rstrip("/") + "/"
    return remote[len(prefix) :] if remote.startswith(prefix) else remote


def _write_local_json(folder: Path, name: str, payload: dict[str, Any]) -> Path:
    path = folder / name
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def _profile_with_runner(
    transport: Transport,
    plan: _Plan,
    file: LocalFile,
    remote: str,
    request: ProfileRequest,
    python: str,
    work: Path,
    cancel: CancelToken | None,
) -> ComponentProfile:
    """Run the runner for one component; on a timeout or a lost link, pull its partial file."""
    timeout = request.timeout_s + request.thermal_seconds
    name = f"request-{plan.name}.json"
    remote_request = transport.path(name)
    payload = {
        "models": [{"name": plan.name, "path": _relative(transport, remote), "inputs": plan.inputs}],
        "ep": request.ep,
        "threads": request.threads,
        "warmup": request.warmup,
        "runs": request.runs,
        "op_profile_runs": request.op_profile_runs,
        "thermal_seconds": request.thermal_seconds if plan.role == "unet" else 0,
        "deadline_s": max(1.0, timeout * 0.9 - 2.0),
        "workdir": ".",
        "seed": 0,
    }
    transport.push(str(_write_local_json(work, name, payload)), remote_request, timeout=60)
    runner = transport.path(f"files/{RUNNER_NAME}")
    command = f"cd {quote(transport.workdir)} && rm -f {quote(name + '.partial.json')} && {quote(python)} {quote(runner)} profile {quote(name)}"
    try:
        result = transport.run(command, timeout=timeout, cancel=_cancel_check(cancel))
    except DeviceError as exc:
        partial = _pull_partial(transport, remote_request + ".partial.json", work)
        components = (partial or {}).get("components") or [{}]
        raw = dict(components[-1], partial=True, error=exc.message)
        component = _component_from_runner(plan, file, raw)
        raise _PartialComponent(component, exc) from exc
    payload_out = _parse_runner_output(transport.target, result.stdout, result.stderr)
    if not payload_out.get("ok"):
        if payload_out.get("missing"):
            raise DeviceError(
                f"{transport.target}: the device's Python lacks {', '.join(payload_out['missing'])}",
                hint=INSTALL_MODULES,
            )
        raise DeviceError(
            f"{transport.target}: the runner failed on {plan.name}: {payload_out.get('error', '?')}"
        )
    components = payload_out.get("components") or [{}]
    raw = dict(components[0])
    if payload_out.get("errors") and not raw.get("error"):
        raw["error"] = "; ".join(payload_out["errors"])
        raw["partial"] = True
    return _component_from_runner(plan, file, raw)


class _PartialComponent(Exception):
    """A component that stopped early, with what it measured and the error that stopped it."""

    def __init__(self, component: ComponentProfile, error: DeviceError) -> None:
        super().__init__(error.message)
        self.component = component
        self.error = error


def _pull_partial(transport: Transport, remote: str, work: Path) -> dict[str, Any] | None:
    local = work / "partial.json"
    try:
        transport.pull(remote, str(local), timeout=30)
        return json.loads(local.read_text(encoding="utf-8"))
    except (DeviceError, OSError, ValueError) as exc:
        log.info("no partial result to pull from %s: %s", remote, exc)
        return None


def _profile_with_perf_test(
    transport: Transport,
    plan: _Plan,
    file: LocalFile,
    remote: str,
    request: ProfileRequest,
    cancel: CancelToken | None,
) -> ComponentProfile:
    args = build_command(
        request.perf_test or "onnxruntime_perf_test",
        _relative(transport, remote),  # it runs in the work folder, which may itself be relative
        ep=request.ep,
        runs=request.runs,
        threads=request.threads,
    )
    result = transport.run(
        f"cd {quote(transport.workdir)} && {command_line(args)}",
        timeout=request.timeout_s,
        cancel=_cancel_check(cancel),
    )
    if not result.ok and (result.returncode == 127 or "not found" in result.stderr.lower()):
        raise DeviceError(
            f"{transport.target}: onnxruntime_perf_test not found at {request.perf_test}",
            hint="push a build of it to the device (docs/devices.md) and pass its path with --perf-test",
        )
    component = parse_output(result.stdout, name=plan.name, role=plan.role, file=file.name, runs=request.runs)
    return dataclasses.replace(
        component, sha256=file.sha256, input_shapes={k: v["shape"] for k, v in plan.inputs.items()}
    )


def profile(
    request: ProfileRequest, on_event: EventCallback | None = None, cancel: CancelToken | None = None
) -> ProfileResult:
    """Profile ``request.model`` on ``request.target``; see the module docstring. Returns the result
    (saved to ``<SNAPGEN_HOME>/profiles/`` when ``request.save``; ``result.runtime["saved_to"]``).

    Raises DeviceError for an unusable device (nothing measured), Cancelled on cancel. A device
    that fails after some components were measured gives a result with ``partial=True``.
    """
    with reporting_outcome(on_event, PROFILE_STAGE):
        return _profile(request, on_event, cancel)


def _profile(
    request: ProfileRequest, on_event: EventCallback | None, cancel: CancelToken | None
) -> ProfileResult:
    model = _load_model(request.model, request.precision)
    plans, settings = _plans(model, request)
    opts = options_for(request.target, request.connect)
    python = opts.remote_python
    total = len(plans)
    _emit(
        on_event,
        Event(
            kind="started",
            stage=PROFILE_STAGE,
            total=total,
            message=f"{model.manifest.name} {model.precision} on {request.target}",
        ),
    )
    with (
        open_transport(request.target, request.connect) as transport,
        tempfile.TemporaryDirectory(prefix="snapgen-profile-") as tmp,
    ):
        work = Path(tmp)
        device = transport.describe()
        _emit(on_event, Event(kind="log", stage=PROFILE_STAGE, message=f"device: {device.summary()}"))
        files = [_prepare_plan_file(p, request) for p in plans]
        to_push = list(files) if request.perf_test else [_runner_file(), *files]
        to_push += [
            f
            for f in _model_files(model)
            if f.name.startswith(tuple(p.file.name + "." for p in plans)) and not request.ort_format
        ]
        to_push = list({f.name: f for f in to_push}.values())
        facts: dict[str, Any] = {}
        if not request.perf_test:
            # Python + modules first: a device without them should fail before a long push.
            runner_sync = sync_files(transport, [_runner_file()], cancel=_cancel_check(cancel))
            facts = check_device_runtime(transport, python, runner_sync.remote_paths[RUNNER_NAME])
            _require_provider(transport, facts, request.ep)

        def on_push(name: str, index: int, count: int) -> None:
            _emit(
                on_event,
                Event(kind="log", stage=PROFILE_STAGE, message=f"pushing {name} ({index + 1}/{count})"),
            )

        sync = sync_files(transport, to_push, cancel=_cancel_check(cancel), on_push=on_push)
        if sync.reused:
            _emit(
                on_event,
                Event(
                    kind="log", stage=PROFILE_STAGE, message=f"reused on the device: {', '.join(sync.reused)}"
                ),
            )
        components: list[ComponentProfile] = []
        errors: list[str] = []
        for index, (plan, file) in enumerate(zip(plans, files, strict=True)):
            if cancel is not None:
                cancel.raise_if_cancelled()
            _emit(
                on_event,
                Event(
                    kind="progress",
                    stage=PROFILE_STAGE,
                    step=index,
                    total=total,
                    message=f"timing {plan.name}",
                ),
            )
            remote = sync.remote_paths[file.name]
            try:
                if request.perf_test:
                    component = _profile_with_perf_test(transport, plan, file, remote, request, cancel)
                else:
                    component = _profile_with_runner(
                        transport, plan, file, remote, request, python, work, cancel
                    )
            except _PartialComponent as stopped:
                components.append(stopped.component)
                errors.append(f"{plan.name}: {stopped.error}")
                break  # the link is gone or the device hangs: keep what was measured
            except DeviceError as exc:
                if not components:
                    raise
                errors.append(f"{plan.name}: {exc}")
                break
            components.append(component)
            if component.error:
                errors.append(f"{plan.name}: {component.error}")
        _emit(on_event, Event(kind="progress", stage=PROFILE_STAGE, step=total, total=total, message="done"))
    missing = [p.name for p in plans if p.name not in {c.name for c in components}]
    if missing:
        errors.append(f"not measured: {', '.join(missing)}")
    runtime = {
        k: str(v)
        for k, v in facts.get("device", {}).items()
        if k in ("python", "onnxruntime", "machine", "system", "cpu_count")
    }
    if facts.get("device", {}).get("providers"):
        runtime["providers"] = ",".join(facts["device"]["providers"])
    result = ProfileResult(
        target=transport.target,
        device=device,
        model_name=model.manifest.name,
        bundle_hash=model.bundle_hash,
        precision=model.precision,
        provider=request.ep,
        threads=request.threads,
        runs=request.runs,
        steps=int(settings["steps"]),
        guidance_scale=float(settings["guidance_scale"]),
        width=int(settings["width"]),
        height=int(settings["height"]),
        components=tuple(components),
        partial=bool(errors) or any(c.partial for c in components),
        errors=tuple(errors),
        runtime={
            **runtime,
            "tool": "perf_test" if request.perf_test else "runner",
            "ort_format": str(request.ort_format),
            "fixed_shapes": str(request.fixed_shapes),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=__version__,
    )
    if request.save:
        path = save_profile(result)
        result = dataclasses.replace(result, runtime={**result.runtime, "saved_to": str(path)})
    _emit(
        on_event,
        Event(
            kind="finished",
            stage=PROFILE_STAGE,
            step=total,
            total=total,
            data={"partial": result.partial, "saved_to": result.runtime.get("saved_to", "")},
        ),
    )
    return result


# -- generate on the device ------------------------------------------------------------------------


def generate_on_device(
    request: GenerationRequest,
    target: str,
    *,
    connect: ConnectOptions | None = None,
    ep: str = "cpu",
    timeout_s: float = 1800.0,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
) -> GenerationResult:
    """Run the whole text-to-image loop of ``request`` on ``target`` and write the PNGs here.

    Tokenization happens on this computer (the device needs no tokenizers); the runner runs the
    text encoder(s), the Euler loop with the same seeded noise and the decoder, and returns uint8
    pixels [N, H, W, 3] as .npy. Each PNG has the usual metadata plus ``device`` (target and
    description) and ``device_timings`` (JSON: seconds per component and per step, measured on
    the device). ``request.device`` must be "auto"; ``ep`` picks the device's provider.
    """
    with reporting_outcome(on_event, GENERATE_STAGE):
        return _generate_on_device(request, target, connect, ep, timeout_s, on_event, cancel)


def _resolved_request(request: GenerationRequest, model: _Model) -> tuple[GenerationRequest, list[int]]:
    from snapgen_app.pipeline.text_to_image import size_stride

    defaults = model.manifest.defaults
    resolved = request.replace(
        model=request.model or model.name,
        steps=request.steps or defaults.steps,
        width=request.width or defaults.width,
        height=request.height or defaults.height,
        shift=request.shift if request.shift is not None else defaults.shift,
        guidance_scale=request.guidance_scale
        if request.guidance_scale is not None
        else defaults.guidance_scale,
        precision=model.precision,
    )
    stride = size_stride(model.manifest)
    for name in ("width", "height"):
        value = int(getattr(resolved, name))
        if value % stride:
            raise ConfigError(name, f"{value} is not a multiple of {stride} (this model's stride)")
    base = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if base + request.num_images - 1 > MAX_SEED:
        raise ConfigError("seed", f"{base} + {request.num_images} images passes the largest seed {MAX_SEED}")
    seeds = [base + i for i in range(request.num_images)]
    return resolved.replace(seed=seeds[0]), seeds


def _tokenized(model: _Model, prompt: str, cfg: bool) -> list[dict[str, Any]]:
    from snapgen_app.runtime.tokenizer import PromptTokenizer

    variant = model.manifest.variant(model.precision)
    specs = model.manifest.model.text_encoders
    files = list(variant.text_encoder) or [s.file for s in specs]
    prompts = [prompt, ""] if cfg else [prompt]  # one batch, so both share a length (as on the host)
    encoders = []
    for spec, file in zip(specs, files, strict=True):
        tokenizer = PromptTokenizer.from_file(
            model.root / spec.tokenizer, spec.max_length, spec.pad_to_max_length
        )
        batch = tokenizer.encode(prompts)
        encoders.append(
            {
                "file": file,
                "input_ids": batch.input_ids.tolist(),
                "attention_mask": batch.attention_mask.tolist(),
            }
        )
    return encoders


def _generate_on_device(
    request: GenerationRequest,
    target: str,
    connect: ConnectOptions | None,
    ep: str,
    timeout_s: float,
    on_event: EventCallback | None,
    cancel: CancelToken | None,
) -> GenerationResult:
    from snapgen_app.pipeline.png import ImageProvenance, encode_png, png_text_chunks, write_files_atomically
    from snapgen_app.service import output_paths_for

    started = time.perf_counter()
    if ep not in EPS:
        raise ConfigError("ep", repr(ep), allowed=list(EPS))
    model = _load_model(request.model, request.precision)
    resolved, seeds = _resolved_request(request, model)
    cfg = float(resolved.guidance_scale or 0.0) > 1.0
    encoders = _tokenized(model, resolved.prompt, cfg)
    paths = output_paths_for(request, seeds)
    steps = int(resolved.steps or 0)
    _emit(
        on_event,
        Event(
            kind="started",
            stage=GENERATE_STAGE,
            total=steps,
            message=f"{model.manifest.name} {model.precision} on {target}",
            data={"seeds": seeds, "target": target},
        ),
    )
    opts = options_for(target, connect)
    variant = model.manifest.variant(model.precision)
    with (
        open_transport(target, connect) as transport,
        tempfile.TemporaryDirectory(prefix="snapgen-remote-") as tmp,
    ):
        work = Path(tmp)
        device = transport.describe()
        runner_sync = sync_files(transport, [_runner_file()], cancel=_cancel_check(cancel))
        facts = check_device_runtime(transport, opts.remote_python, runner_sync.remote_paths[RUNNER_NAME])
        _require_provider(transport, facts, ep)
        push_start = time.perf_counter()
        sync = sync_files(
            transport,
            _model_files(model),
            cancel=_cancel_check(cancel),
            on_push=lambda name, i, n: _emit(
                on_event, Event(kind="log", stage=GENERATE_STAGE, message=f"pushing {name} ({i + 1}/{n})")
            ),
        )
        push_seconds = time.perf_counter() - push_start
        run_id = uuid.uuid4().hex[:12]
        output_name = f"image-{run_id}.npy"
        payload = {
            "text_encoders": [
                {
                    "path": _relative(transport, sync.remote_paths[e["file"]]),
                    "input_ids": e["input_ids"],
                    "attention_mask": e["attention_mask"],
                }
                for e in encoders
            ],
            "unet": _relative(transport, sync.remote_paths[variant.unet]),
            "decoder": _relative(transport, sync.remote_paths[variant.decoder]),
            "seeds": seeds,
            "steps": steps,
            "shift": float(resolved.shift or 1.0),
            "guidance_scale": float(resolved.guidance_scale or 0.0),
            "latent_channels": model.manifest.model.latent_channels,
            "vae_scale_factor": model.manifest.model.vae_scale_factor,
            "null_condition": model.manifest.model.null_condition,
            "width": int(resolved.width or 0),
            "height": int(resolved.height or 0),
            "ep": ep,
            "threads": request.threads or 0,
            "output": output_name,
        }
        request_name = f"generate-{run_id}.json"
        transport.push(
            str(_write_local_json(work, request_name, payload)), transport.path(request_name), timeout=60
        )
        _emit(on_event, Event(kind="log", stage=GENERATE_STAGE, message=f"running on {target}"))
        runner = runner_sync.remote_paths[RUNNER_NAME]
        # Earlier runs' leftovers (a pulled image, a request) go first: one remote command, not two.
        command = (
            f"cd {quote(transport.workdir)} && rm -f $(ls image-*.npy generate-*.json 2>/dev/null | grep -v {quote(request_name)}) "
            f"&& {quote(opts.remote_python)} {quote(runner)} generate {quote(request_name)}"
        )
        result = transport.run(command, timeout=timeout_s, cancel=_cancel_check(cancel))
        answer = _parse_runner_output(transport.target, result.stdout, result.stderr)
        if not answer.get("ok"):
            raise DeviceError(
                f"{transport.target}: generation on the device failed: {answer.get('error', '?')}"
            )
        pull_start = time.perf_counter()
        local_npy = work / output_name
        transport.pull(transport.path(output_name), str(local_npy), timeout=300)
        pull_seconds = time.perf_counter() - pull_start
        pixels = np.load(local_npy, allow_pickle=False)  # .npy of uint8: never a pickle
    expected = (len(seeds), int(resolved.height or 0), int(resolved.width or 0), 3)
    if pixels.dtype != np.uint8 or pixels.shape != expected:
        raise DeviceError(
            f"{target}: the device returned images {pixels.dtype} {pixels.shape}, expected uint8 {expected}"
        )
    provider = str(answer.get("provider_used", runner_module.EP_NAMES[ep]))
    device_timings = {
        "target": transport.target,
        "timings": answer.get("timings", {}),
        "step_times_s": answer.get("step_times_s", []),
        "peak_rss_bytes": answer.get("peak_rss_bytes"),
        "onnxruntime": answer.get("device", {}).get("onnxruntime", ""),
    }
    files, first_text = [], {}
    for index, (seed, path) in enumerate(zip(seeds, paths, strict=True)):
        image = ImageProvenance(
            seed, index, model.manifest.name, model.bundle_hash, model.precision, provider, __version__
        )
        text = png_text_chunks(resolved, image)
        text["device"] = f"{transport.target} | {device.summary()}"
        text["device_timings"] = json.dumps(device_timings, sort_keys=True, separators=(",", ":"))
        first_text = first_text or text
        files.append((path, encode_png(pixels[index], text)))
    paths = write_files_atomically(files, keep_existing=not request.output_paths)
    timings = {f"device_{k}": float(v) for k, v in answer.get("timings", {}).items()}
    timings.update(push=push_seconds, pull=pull_seconds, total=time.perf_counter() - started)
    _emit(
        on_event,
        Event(
            kind="finished",
            stage=GENERATE_STAGE,
            step=steps,
            total=steps,
            data={"images": [str(p) for p in paths], "seeds": seeds},
        ),
    )
    return GenerationResult(
        images=tuple(str(p) for p in paths),
        seeds=tuple(seeds),
        timings=timings,
        provider=f"{provider} @ {transport.target}",
        precision=model.precision,
        bundle_hash=model.bundle_hash,
        model_name=model.manifest.name,
        request=resolved,
        metadata=first_text,
    )


def describe_target(target: str, connect: ConnectOptions | None = None) -> DeviceInfo:
    """Connect to ``target`` and describe it (the UI's "test connection" button)."""
    with open_transport(target, connect) as transport:
        return transport.describe()


__all__ = [
    "ConnectOptions",
    "DeviceInfo",
    "ProfileRequest",
    "ProfileResult",
    "TargetSpec",
    "add_target",
    "describe_target",
    "forget_target",
    "generate_on_device",
    "list_devices",
    "open_transport",
    "profile",
    "saved_targets",
]

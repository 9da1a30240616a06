"""The one generation API that the command line and the Qt application call.

``generate(request, on_event, cancel)`` resolves the model (a registered name, a bundle directory,
or "" for the default), verifies the bundle against its ``bundle.json`` on first load, picks the
provider and precision, runs the text-to-image pipeline and writes the PNGs atomically. Loaded
pipelines (and their onnxruntime sessions) are cached across calls; the cache key includes the
size and mtime of every file used, so a file replaced on disk is verified and loaded again.

Events (``snapgen_app.progress.Event``, stage "generate"): ``started`` (total = steps), one
``progress`` per denoising step (see ``snapgen_app.api.StepEvent``), ``log`` for each warning,
then ``finished`` (data: images, seeds), ``cancelled`` or ``error``. Nothing here imports torch and
nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_store import bundle as store_bundle
from model_store import registry
from model_store.errors import DISK_FULL_ERRNOS, StoreCancelled, StoreError
from model_store.paths import store_home
from snapgen_app import __version__
from snapgen_app.api import GENERATE_STAGE, MAX_SEED, GenerationRequest, GenerationResult, StepEvent
from snapgen_app.errors import BundleError, Cancelled, ConfigError, ModelNotFoundError, SnapGenError
from snapgen_app.pipeline.png import ImageProvenance, encode_png, png_text_chunks, write_files_atomically
from snapgen_app.pipeline.text_to_image import TextToImagePipeline, size_stride
from snapgen_app.progress import CancelToken, EtaEstimator, Event, EventCallback, reporting_outcome
from snapgen_app.progress import emit as _emit
from snapgen_app.runtime.providers import CPU, choose_providers
from snapgen_app.runtime.sessions import RuntimeOptions, SessionCache

if TYPE_CHECKING:
    from snapgen_app.devices.report import ProfileResult
    from snapgen_app.devices.service import ProfileRequest
    from snapgen_app.devices.transport import DeviceInfo

log = logging.getLogger(__name__)

#: Precision preference for ``precision="auto"``: int8 is the fast path on CPUs (fp16 gives no
#: speed-up there, see the ORT notes); GPUs prefer fp16.
AUTO_PRECISION_CPU: tuple[str, ...] = ("int8", "fp32", "fp16")
AUTO_PRECISION_GPU: tuple[str, ...] = ("fp16", "fp32", "int8")


@dataclass
class _Loaded:
    pipeline: TextToImagePipeline
    bundle_hash: str
    load_seconds: float


#: Loaded pipelines, most recently used last. Each holds its own sessions (SessionCache), so
#: evicting one frees its memory; a changed file on disk (size/mtime) replaces the entry.
_PIPELINES: OrderedDict[tuple[object, ...], tuple[tuple[object, ...], _Loaded]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
MAX_CACHED_PIPELINES = 2


def clear_cache() -> None:
    """Forget every loaded pipeline and session (frees their memory)."""
    with _CACHE_LOCK:
        _PIPELINES.clear()


# -- model resolution ------------------------------------------------------------------------------


def resolve_model(model: str) -> tuple[Path, str]:
    """(bundle directory, model name) for a registered name, a bundle folder path, or "" (the
    registry's default model). Raises ModelNotFoundError with what to do when nothing answers."""
    candidate = Path(model).expanduser() if model else None
    if candidate is not None and (candidate / store_bundle.MANIFEST_NAME).is_file():
        return candidate.resolve(), model
    if candidate is not None and (candidate.is_dir() or len(candidate.parts) > 1):
        raise ModelNotFoundError(
            f"{candidate} is not a runtime bundle folder (no bundle.json there)",
            hint="export one with `snapgen export CHECKPOINT --out DIR`, or pass an installed model name",
        )
    try:
        entry = registry.resolve(model or None)
    except StoreError as exc:
        raise ModelNotFoundError(exc.message, hint=exc.hint) from exc
    if not entry.has_bundle:
        raise ModelNotFoundError(
            f"model {entry.name!r} is a training checkpoint without a runtime bundle",
            hint=f"export it with `snapgen export {entry.path} --out DIR`",
        )
    return entry.path, entry.name


def size_stride_of(model: str) -> int:
    """Pixels that a width or height of ``model`` (a name, a bundle folder, or "" for the default)
    must be a multiple of, read from its bundle.json without loading it (for size widgets)."""
    root, _ = resolve_model(model)
    try:
        return size_stride(store_bundle.read_manifest(root))
    except StoreError as exc:
        raise _store_error(exc) from exc


# -- loading ---------------------------------------------------------------------------------------


def _store_error(exc: StoreError) -> BundleError:
    """The model store's error as ours, keeping its message (which names the file) and hint."""
    return BundleError(exc.message, hint=exc.hint)


def _choose_precision(
    root: Path, manifest: store_bundle.BundleManifest, requested: str, provider: str
) -> str:
    """The variant to run. An explicit precision must be in the manifest; "auto" takes the first
    complete variant in the provider's preference order. When no variant is complete, the preferred
    one is returned anyway so that verification reports which files are missing."""
    if requested != "auto":
        if requested not in manifest.precisions:
            raise ConfigError(
                "precision",
                f"model {manifest.name!r} has no {requested!r} variant",
                allowed=list(manifest.precisions),
            )
        return requested
    order = AUTO_PRECISION_CPU if provider == CPU else AUTO_PRECISION_GPU
    installed = store_bundle.installed_precisions(root, manifest)
    preferred = [p for p in order if p in manifest.precisions]
    chosen = next((p for p in preferred if p in installed), preferred[0])
    if chosen != preferred[0]:
        log.info("precision auto: %s is incomplete on disk, using %s", preferred[0], chosen)
    return chosen


def _file_stamp(root: Path, names: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    stamps = []
    for name in (store_bundle.MANIFEST_NAME, *names):
        try:
            stat = (root / name).stat()
            stamps.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((name, -1, -1))
    return tuple(stamps)


def load_pipeline(
    root: Path,
    precision: str,
    providers: list[str],
    options: RuntimeOptions,
    cancel: CancelToken | None = None,
) -> tuple[_Loaded, bool]:
    """The cached pipeline for this bundle/precision/providers/options, loading and verifying it
    when needed. Returns (loaded, was_cached). Raises BundleError naming a missing/altered file, and
    Cancelled when ``cancel`` is set while the files are hashed (seconds for a large model)."""
    try:
        manifest = store_bundle.read_manifest(root)
        files = manifest.variant_files(precision)
    except StoreError as exc:
        raise _store_error(exc) from exc
    key = (str(root), precision, tuple(providers), options)
    stamp = _file_stamp(root, files)
    with _CACHE_LOCK:
        cached = _PIPELINES.get(key)
        if cached is not None and cached[0] == stamp:
            _PIPELINES.move_to_end(key)
            return cached[1], True
        _PIPELINES.pop(key, None)  # stale: a file changed on disk; verify and load again
    start = time.perf_counter()
    try:
        manifest = store_bundle.verify_or_raise(
            root, precisions=[precision], cancel=None if cancel is None else lambda: cancel.cancelled
        )
    except StoreCancelled:
        raise Cancelled("cancelled by the user") from None
    except StoreError as exc:
        raise _store_error(exc) from exc
    if cancel is not None:
        cancel.raise_if_cancelled()  # before the sessions are built
    bundle_hash = hashlib.sha256((root / store_bundle.MANIFEST_NAME).read_bytes()).hexdigest()
    pipeline = TextToImagePipeline(root, manifest, precision, providers, options, SessionCache())
    pipeline.load()
    loaded = _Loaded(pipeline, bundle_hash, time.perf_counter() - start)
    with _CACHE_LOCK:
        _PIPELINES[key] = (stamp, loaded)
        while len(_PIPELINES) > MAX_CACHED_PIPELINES:
            _PIPELINES.popitem(last=False)
    return loaded, False


# -- generate --------------------------------------------------------------------------------------


def _seeds(request: GenerationRequest) -> list[int]:
    base = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if base + request.num_images - 1 > MAX_SEED:
        raise ConfigError("seed", f"{base} + {request.num_images} images passes the largest seed {MAX_SEED}")
    return [base + i for i in range(request.num_images)]


def output_paths_for(request: GenerationRequest, seeds: list[int]) -> list[Path]:
    if request.output_paths:
        return [Path(p).expanduser() for p in request.output_paths]
    folder = Path(request.output_dir).expanduser() if request.output_dir else store_home() / "outputs"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    paths: list[Path] = []
    for seed in seeds:
        path = folder / f"{stamp}-{seed}.png"
        counter = 1
        while path.exists() or path in paths:
            path = folder / f"{stamp}-{seed}-{counter}.png"
            counter += 1
        paths.append(path)
    return paths


def generate(
    request: GenerationRequest,
    on_event: EventCallback | None = None,
    cancel: CancelToken | None = None,
) -> GenerationResult:
    """Generate ``request.num_images`` images and write them as PNGs with full metadata.

    Raises a SnapGenError subclass (UsageError for bad settings, BundleError for a damaged model,
    ProviderError for a missing provider, Cancelled when ``cancel`` fires); nothing is written in
    any of those cases.
    """
    with reporting_outcome(on_event, GENERATE_STAGE):
        return _generate(request, on_event, cancel)


def _write_images(files: list[tuple[Path, bytes]], *, keep_existing: bool = False) -> list[Path]:
    """Write the PNGs atomically (returns their paths; see write_files_atomically's
    ``keep_existing``); a full disk (or quota) becomes a SnapGenError saying so and what to do,
    instead of a bare OS error (write_files_atomically already removed its temp files)."""
    try:
        return write_files_atomically(files, keep_existing=keep_existing)
    except SnapGenError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS):
            raise
        folders = sorted({str(path.parent) for path, _ in files})
        raise SnapGenError(
            f"the disk is full: {len(files)} image(s) could not be written to {', '.join(folders)} "
            f"({cause.strerror or 'no space left'})",
            hint="free some space on that disk (or choose another output folder), then generate again",
        ) from cause


def _generate(
    request: GenerationRequest, on_event: EventCallback | None, cancel: CancelToken | None
) -> GenerationResult:
    started = time.perf_counter()
    root, model_name = resolve_model(request.model)
    providers = choose_providers(request.device)
    try:
        manifest = store_bundle.read_manifest(root)
        precision = _choose_precision(root, manifest, request.precision, providers[0])
    except StoreError as exc:
        raise _store_error(exc) from exc
    defaults = manifest.defaults
    resolved = request.replace(
        model=request.model or model_name,
        steps=request.steps if request.steps is not None else defaults.steps,
        width=request.width if request.width is not None else defaults.width,
        height=request.height if request.height is not None else defaults.height,
        shift=request.shift if request.shift is not None else defaults.shift,
        guidance_scale=request.guidance_scale
        if request.guidance_scale is not None
        else defaults.guidance_scale,
        precision=precision,
    )
    options = RuntimeOptions(
        intra_op_threads=request.threads or 0,
        optimized_cache=str(store_home() / "cache" / "onnxruntime"),
    )
    loaded, was_cached = load_pipeline(root, precision, providers, options, cancel)
    if request.precision == "auto" and providers[0] != CPU and loaded.pipeline.provider_used == CPU:
        # The GPU provider is installed but cannot run here (no device, a CUDA/cuDNN mismatch):
        # onnxruntime fell back to the CPU, so pick the variant that is best on the CPU instead.
        cpu_precision = _choose_precision(root, manifest, "auto", CPU)
        if cpu_precision != precision:
            log.warning(
                "%s fell back to the CPU: running the %s variant instead of %s",
                providers[0],
                cpu_precision,
                precision,
            )
            with _CACHE_LOCK:  # the GPU variant running on the CPU is not kept in memory
                _PIPELINES.pop((str(root), precision, tuple(providers), options), None)
            precision, providers = cpu_precision, [CPU]
            resolved = resolved.replace(precision=precision)
            loaded, was_cached = load_pipeline(root, precision, providers, options, cancel)
    pipeline = loaded.pipeline
    steps, width, height = int(resolved.steps or 0), int(resolved.width or 0), int(resolved.height or 0)
    pipeline.check_size(width, height)
    seeds = _seeds(request)
    resolved = resolved.replace(seed=seeds[0])
    paths = output_paths_for(request, seeds)
    provider = pipeline.provider_used
    _emit(
        on_event,
        Event(
            kind="started",
            stage=GENERATE_STAGE,
            total=steps,
            message=f"{manifest.name} {precision} on {provider}",
            data={"model": manifest.name, "seeds": seeds, "precision": precision, "provider": provider},
        ),
    )
    eta = EtaEstimator(steps)

    def on_step(step: int, total: int, t: float, preview: np.ndarray | None) -> None:
        event = StepEvent(step=step, total=total, t=t, preview=preview).to_event()
        _emit(on_event, replace(event, eta_s=eta.eta(step)))

    output = pipeline.generate(
        resolved.prompt,
        seeds,
        steps=steps,
        width=width,
        height=height,
        shift=float(resolved.shift or 1.0),
        guidance_scale=float(resolved.guidance_scale or 0.0),
        preview=request.preview,
        on_step=on_step,
        cancel=cancel,
    )
    for warning in output.warnings:
        _emit(on_event, Event(kind="log", stage=GENERATE_STAGE, message=warning))
    if cancel is not None:
        cancel.raise_if_cancelled()

    write_start = time.perf_counter()
    files, first_text = [], {}
    for index, (seed, path, pixels) in enumerate(zip(seeds, paths, output.images, strict=True)):
        image = ImageProvenance(
            seed, index, manifest.name, loaded.bundle_hash, precision, provider, __version__
        )
        text = png_text_chunks(resolved, image)
        first_text = first_text or text
        files.append((path, encode_png(pixels, text)))
    # Names the application chose never replace a file written meanwhile (a second generation with
    # the same seed in the same second); names the user gave (-o) are written as asked.
    paths = _write_images(files, keep_existing=not request.output_paths)
    timings = {"load": 0.0 if was_cached else loaded.load_seconds, **output.timings}
    timings["write"] = time.perf_counter() - write_start
    timings["total"] = time.perf_counter() - started
    result = GenerationResult(
        images=tuple(str(p) for p in paths),
        seeds=tuple(seeds),
        timings=timings,
        provider=provider,
        precision=precision,
        bundle_hash=loaded.bundle_hash,
        model_name=manifest.name,
        request=resolved,
        metadata=first_text,
        warnings=tuple(output.warnings),
    )
    _emit(
        on_event,
        Event(
            kind="finished",
            stage=GENERATE_STAGE,
            step=steps,
            total=steps,
            data={"images": list(result.images), "seeds": seeds},
        ),
    )
    return result


# --- Helpers the application needs beside generation ---------------------------------------------


def read_png_request(path: str | Path) -> GenerationRequest:
    """The request that reproduces the image at ``path`` (its own seed, one image, no output paths).

    Reads our ``snapgen`` chunk, else an AUTOMATIC1111 ``parameters`` chunk; UsageError otherwise.
    """
    from snapgen_app.pipeline.png import read_png_metadata

    return read_png_metadata(path)


def read_png_text(path: str | Path) -> dict[str, str]:
    """Every text chunk of a PNG; UsageError when the file is not a readable PNG."""
    from snapgen_app.pipeline.png import read_png_text as _read

    return _read(path)


@dataclass(frozen=True)
class DeviceChoice:
    """A device this machine's onnxruntime really offers: the request value and its provider."""

    device: str
    provider: str


def available_devices() -> list[DeviceChoice]:
    """Devices whose provider the installed onnxruntime has, best first; CPU is always last."""
    from snapgen_app.runtime.providers import AUTO_ORDER, PROVIDER_BY_DEVICE, available_providers

    present = set(available_providers())
    return [DeviceChoice(d, PROVIDER_BY_DEVICE[d]) for d in AUTO_ORDER if PROVIDER_BY_DEVICE[d] in present]


# --- Remote devices (the device page and `snapgen devices` reach them through here) --------------
# Imported on first use: the SSH transport's library loads only when a device is used.


def list_remote_devices() -> list[DeviceInfo]:
    """Attached adb devices (any state) and saved SSH targets; see ``snapgen_app.devices.service``."""
    from snapgen_app.devices import service as devices

    return devices.list_devices()


def profile_on_device(
    request: ProfileRequest, on_event: EventCallback | None = None, cancel: CancelToken | None = None
) -> ProfileResult:
    """Profile a model on a remote device (``devices.service.ProfileRequest`` -> ``ProfileResult``)."""
    from snapgen_app.devices import service as devices

    return devices.profile(request, on_event, cancel)


def profile_request(**fields: Any) -> ProfileRequest:
    """Build a validated ``ProfileRequest`` without importing the devices package in the caller."""
    from snapgen_app.devices.service import ProfileRequest

    return ProfileRequest(**fields)


# --- Fine-tuning (the wizard) and device-page helpers ---------------------------------------------
# snapgen_app.finetune is torch-free: it runs `python -m training_tools` and `snapgen export` as
# subprocesses. The UI reaches it as ``service.finetune`` (FineTuneRequest, start, attach, finish, ...).
from snapgen_app import finetune as finetune  # noqa: E402  (re-export)


def add_device_target(target: str, **options: Any) -> str:
    """Save an SSH/adb target with its ``devices.service.ConnectOptions`` fields; canonical text."""
    from snapgen_app.devices import service as devices

    return devices.add_target(target, devices.ConnectOptions(**options))


def compare_profiles(a: ProfileResult, b: ProfileResult) -> list[Any]:
    """Rows (name, a_s, b_s, ratio) comparing two profiles; see ``devices.report.compare_profiles``."""
    from snapgen_app.devices.report import compare_profiles as _compare

    return _compare(a, b)


def load_device_profile(path: str | Path) -> ProfileResult:
    """A profile saved by ``profile_on_device`` (``$SNAPGEN_HOME/profiles/*.json``)."""
    from snapgen_app.devices.report import load_profile

    return load_profile(path)

"""ONNX Runtime sessions: options, lazy creation, a cache, and clear errors for bad files.

A session is created the first time it is needed and cached per (file, provider list, options), so
a second generation with the same model pays no load time. A file that is missing or not an ONNX
model raises :class:`BundleError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from snapgen_app import __version__
from snapgen_app.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

GraphOptimization = Literal["disable", "basic", "extended", "all"]
_OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeOptions:
    """Session settings exposed to users and benchmarks.

    ``intra_op_threads``/``inter_op_threads``: 0 lets onnxruntime decide (one per physical core).
    ``cpu_mem_arena``: keep ORT's memory arena (faster repeated runs, higher peak memory).
    ``mem_pattern``: pre-plan buffers for fixed shapes. ``allow_spinning``: worker threads busy-wait
    between ops (lower latency, burns CPU when the machine is shared). ``optimized_cache``: a folder
    where CPU sessions keep their optimized graphs, so the next process loads one instead of
    optimizing again (see :func:`_create_session`); None = off.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "all"
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    allow_spinning: bool = True
    optimized_cache: str | None = None

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("threads", "must be >= 0 (0 = onnxruntime default)")
        if self.graph_optimization not in _OPT_LEVELS:
            raise ConfigError("graph_optimization", f"{self.graph_optimization!r}", allowed=list(_OPT_LEVELS))

    def to_session_options(self) -> ort.SessionOptions:
        """A fresh ``onnxruntime.SessionOptions`` with these settings."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        options.enable_cpu_mem_arena = self.cpu_mem_arena
        options.enable_mem_pattern = self.mem_pattern
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Same seed -> same bytes: ask providers for deterministic kernels where they have a choice.
        options.use_deterministic_compute = True
        options.log_severity_level = 3  # errors only; our own log says what matters
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        return options


class Session:
    """A lazily created InferenceSession for one ONNX file.

    ``run(feeds)`` takes a dict of numpy arrays and returns a dict of output name -> array.
    """

    def __init__(self, path: Path, providers: Sequence[str], options: RuntimeOptions) -> None:
        self.path = path
        self.providers = tuple(providers)
        self.options = options
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The underlying session, created on first use (raises BundleError for a bad file)."""
        with self._lock:
            if self._session is None:
                self._session = _create_session(self.path, self.providers, self.options)
            return self._session

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inference_session.get_inputs())

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.inference_session.get_outputs())

    @property
    def provider_used(self) -> str:
        """The provider that runs this session's nodes first (after any silent fallback)."""
        return self.inference_session.get_providers()[0]

    def require_io(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        """Raise BundleError when the graph lacks one of the expected input/output names."""
        missing_in = [n for n in inputs if n not in self.input_names]
        missing_out = [n for n in outputs if n not in self.output_names]
        if missing_in or missing_out:
            raise BundleError(
                f"{self.path.name}: the ONNX graph lacks "
                + ", ".join([f"input {n!r}" for n in missing_in] + [f"output {n!r}" for n in missing_out])
                + f" (it has inputs {list(self.input_names)}, outputs {list(self.output_names)})",
                hint="re-export the bundle with `snapgen export`",
            )

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the graph; returns the requested outputs (all by default) by name.

        Feeds are cast to the graph's input dtypes (so an fp16-IO export takes our float32
        arrays), checked against its fixed dimensions (BundleError naming file, input and sizes),
        and split into chunks when the graph was exported with a fixed batch smaller than the
        feeds' batch (outputs are concatenated along axis 0).
        """
        session = self.inference_session
        names = list(outputs) if outputs is not None else list(self.output_names)
        feeds = self._prepared(feeds)
        chunk = self._fixed_batch()
        batch = next(iter(feeds.values())).shape[0] if feeds else 0
        if chunk is None or batch == chunk or batch % chunk:
            return self._run_once(session, names, feeds)
        parts = [
            self._run_once(session, names, {k: v[i : i + chunk] for k, v in feeds.items()})
            for i in range(0, batch, chunk)
        ]
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in names}

    def _run_once(
        self, session: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        try:
            values = session.run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"{self.path.name}: onnxruntime failed to run it: {_first_line(exc)}") from exc
        # our graphs only output dense tensors; asarray also narrows ORT's union return type
        return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}

    def _fixed_batch(self) -> int | None:
        """The batch size every input was exported with, when it is a fixed number."""
        sizes = {i.shape[0] if i.shape else None for i in self.inference_session.get_inputs()}
        size = sizes.pop() if len(sizes) == 1 else None
        return size if isinstance(size, int) and size > 0 else None

    def _prepared(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = {}
        for spec in self.inference_session.get_inputs():
            if spec.name not in feeds:
                continue
            value = np.asarray(feeds[spec.name])
            dtype = _NUMPY_TYPES.get(spec.type)
            if dtype is not None and value.dtype != dtype:
                value = value.astype(dtype)
            for axis, (want, got) in enumerate(zip(spec.shape or [], value.shape, strict=False)):
                if axis > 0 and isinstance(want, int) and want != got:
                    raise BundleError(
                        f"{self.path.name}: input {spec.name!r} was exported with fixed shape {spec.shape}, "
                        f"got {list(value.shape)}",
                        hint="use the size the model was exported for, or re-export it with dynamic axes",
                    )
            prepared[spec.name] = value
        return prepared


_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# Graph optimization is most of a CPU session's creation time: the built-in model's int8 UNet took
# 0.67 s to load with ORT_ENABLE_ALL and 0.16 s as its saved optimized graph with optimization off,
# and both ran the same numbers bit for bit (2-core AVX2 EPYC, onnxruntime 1.32; docs/training.md, session 24).
# The saved graph may hold kernels fused for this CPU, so its key names the CPU, onnxruntime and every
# option besides the model file. Only plain CPU sessions of self-contained files use it.
_CACHEABLE_LEVELS = ("extended", "all")
OPTIMIZED_CACHE_BYTES = 2 * 1024**3  # the least recently used graphs go past this


PARTIAL_MAX_AGE_S = 3600.0  # a .partial older than this was left by a process that did not finish


def _prune(folder: Path, keep: Path) -> None:
    """Delete the least recently used graphs of ``folder`` while it holds more than the cap, and
    graphs half-saved by processes that were stopped (Ctrl-C, killed) while saving."""
    try:
        now = time.time()
        for partial in folder.glob("*.partial"):
            if now - partial.stat().st_mtime > PARTIAL_MAX_AGE_S:
                partial.unlink(missing_ok=True)
        graphs = sorted(folder.glob("*.onnx"), key=lambda g: g.stat().st_mtime, reverse=True)
        total = 0
        for graph in graphs:
            total += graph.stat().st_size
            if total > OPTIMIZED_CACHE_BYTES and graph != keep:
                graph.unlink(missing_ok=True)
    except OSError as exc:  # another process pruning at the same time, a read-only folder
        log.info("optimized-graph cache not pruned: %s", exc)


def _optimized_path(path: Path, providers: Sequence[str], options: RuntimeOptions) -> Path | None:
    if options.optimized_cache is None or tuple(providers) != ("CPUExecutionProvider",):
        return None
    if options.graph_optimization not in _CACHEABLE_LEVELS or _has_companions(path):
        return None
    # The file by path, size and modification time (as SessionCache keys it; the bundle loader has
    # checked its sha256 already), so a cache hit reads no model bytes twice; onnxruntime by version
    # and build, and this application's version (which decides the session options it sets).
    stat = path.stat()
    key = (
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{ort.__version__}|{_ort_build()}|"
        f"{__version__}|{options!r}"
    )
    digest = hashlib.sha256(f"{key}|{platform.machine()}|{_cpu_flags()}".encode())
    return Path(options.optimized_cache) / f"{path.stem}-{digest.hexdigest()[:32]}.onnx"


def _has_companions(path: Path) -> bool:
    """Whether ``path`` may keep weights in other files (``NAME.*`` or ``NAME_*``, the external data
    names a bundle allows): a saved graph would carry those weights inline, and a later change of only
    the companion file would go unnoticed by a key made of the .onnx file's size and time."""
    return any(s != path and s.name.startswith(path.name) for s in path.parent.iterdir())


@functools.cache
def _ort_build() -> str:
    get = getattr(ort, "get_build_info", None)
    return str(get()) if callable(get) else ""


@functools.cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor()


def _create_session(path: Path, providers: Sequence[str], options: RuntimeOptions) -> ort.InferenceSession:
    if not path.is_file():
        raise BundleError(f"model file missing: {path}", hint="re-download or re-export the model")
    optimized = _optimized_path(path, providers, options)
    if optimized is not None and optimized.is_file():
        plain = options.to_session_options()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(optimized), sess_options=plain, providers=list(providers))
            with contextlib.suppress(OSError):
                os.utime(optimized)  # recently used: kept by _prune
            return session
        except Exception as exc:  # a damaged cache file: drop it and optimize the model again
            log.warning(
                "%s: cached optimized graph unusable (%s); rebuilding it", path.name, _first_line(exc)
            )
            optimized.unlink(missing_ok=True)
    session = None
    if optimized is not None:
        # Written whole under a temporary name, then renamed: a crash leaves a .partial file, never
        # half a graph; a cache folder that cannot be written only costs the saving.
        partial = optimized.with_name(f"{optimized.name}.{os.getpid()}-{threading.get_ident()}.partial")
        try:
            optimized.parent.mkdir(parents=True, exist_ok=True)
            saving = options.to_session_options()
            saving.optimized_model_filepath = str(partial)
            session = ort.InferenceSession(str(path), sess_options=saving, providers=list(providers))
            os.replace(partial, optimized)
            _prune(optimized.parent, keep=optimized)
        except Exception as exc:
            log.info("optimized graph of %s not kept: %s", path.name, _first_line(exc))
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        except BaseException:  # Ctrl-C while saving: no full-size .partial left behind
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise
    if session is None:
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options.to_session_options(), providers=list(providers)
            )
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile... all untyped pybind errors
            raise BundleError(
                f"{path.name} is not a loadable ONNX model: {_first_line(exc)}",
                hint="the file is damaged or not an ONNX model; re-download or re-export the model",
            ) from exc
    used = session.get_providers()
    if providers and used and used[0] != providers[0]:
        log.warning("%s: %s could not be used, running on %s", path.name, providers[0], used[0])
    return session


class SessionCache:
    """Sessions keyed by (file, size, mtime, providers, options); created lazily, reused across calls."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[object, ...], Session] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, providers: Sequence[str], options: RuntimeOptions) -> Session:
        """The cached Session for ``path`` (not yet loaded if it was never run)."""
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
            stamp: tuple[int, int] = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)  # missing: the Session raises a clear BundleError when used
        key = (str(resolved), stamp, tuple(providers), options)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = Session(resolved, providers, options)
                self._sessions[key] = session
            return session

    def clear(self) -> None:
        """Drop every session (frees their memory once no pipeline holds them)."""
        with self._lock:
            self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)

"""Get model files onto a device once: optional ORT-format / fixed-shape variants, hash-checked pushes.

- :func:`convert_to_ort` runs ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` (ORT format
  loads faster and is what minimal mobile builds read).
- :func:`make_fixed_shape` fixes every input shape with ``onnxruntime.tools.onnx_model_utils`` (the
  functions behind ``python -m onnxruntime.tools.make_dynamic_shape_fixed``), for providers that
  need static shapes (NNAPI, QNN, CoreML). It needs the ``onnx`` package on the host.
  Both are cached under ``<SNAPGEN_HOME>/devices/prepared/<sha256 of the source>/``.
- :func:`sync_files` pushes files into ``<workdir>/files/`` and keeps ``manifest.json`` there
  (name -> sha256, size). A file whose manifest sha256 equals the local one and whose size on the
  device still matches is reused, not pushed again. Free space is checked with ``df`` before any
  push.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_store.bundle import hash_file
from model_store.paths import store_home
from snapgen_app.devices.transport import CancelCheck, Transport, parse_df_available, quote
from snapgen_app.errors import Cancelled, DeviceError

log = logging.getLogger(__name__)

REMOTE_FILES_DIR = "files"
REMOTE_MANIFEST = "manifest.json"
#: Keep this much free beyond the files themselves (the runner writes profiles and images too).
STORAGE_MARGIN_BYTES = 64 * 2**20


def prepared_dir() -> Path:
    """``<SNAPGEN_HOME>/devices/prepared``: converted / fixed-shape model files, by source hash."""
    return store_home() / "devices" / "prepared"


@dataclass(frozen=True)
class LocalFile:
    """A file to place on the device under ``name`` (relative to ``<workdir>/files``)."""

    name: str
    path: Path
    sha256: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_files` did: remote path per name, which were pushed, which reused."""

    remote_paths: dict[str, str]
    pushed: tuple[str, ...]
    reused: tuple[str, ...]
    pushed_bytes: int


def local_file(name: str, path: Path, sha256: str | None = None) -> LocalFile:
    """A LocalFile; hashes ``path`` unless its sha256 is known (e.g. from bundle.json)."""
    return LocalFile(name, Path(path), sha256 or hash_file(path))


# -- conversion ------------------------------------------------------------------------------------


def convert_to_ort(onnx_path: Path, sha256: str | None = None, timeout: float = 600.0) -> Path:
    """The ORT-format copy of ``onnx_path`` (``<stem>.ort``), converted once and cached."""
    digest = sha256 or hash_file(onnx_path)
    out_dir = prepared_dir() / digest / "ort"
    target = out_dir / f"{onnx_path.stem}.ort"
    if target.is_file():
        return target
    if getattr(sys, "frozen", False):  # the packaged app: sys.executable is snapgen itself, not Python
        raise DeviceError(
            "--ort-format needs onnxruntime's converter, which runs in a Python environment",
            hint="profile the .onnx files (leave out --ort-format), or run snapgen from a pip installation",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        source = Path(work) / onnx_path.name  # the tool converts every .onnx in a folder; give it one
        source.symlink_to(onnx_path.resolve())
        command = [
            sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
            "--output_dir", str(out_dir), "--optimization_style", "Fixed", str(source),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"ORT-format conversion of {onnx_path.name} took over {timeout:.0f} s") from exc
    if done.returncode != 0 or not target.is_file():
        raise DeviceError(
            f"ORT-format conversion of {onnx_path.name} failed: {(done.stderr or done.stdout).strip()[-400:]}",
            hint="profile the .onnx file instead (leave out --ort-format)",
        )
    return target


def make_fixed_shape(onnx_path: Path, shapes: Mapping[str, Sequence[int]], sha256: str | None = None) -> Path:
    """A copy of ``onnx_path`` whose inputs have the fixed ``shapes`` (and inferred output shapes),
    cached by source hash and shapes. Raises DeviceError when ``onnx`` is not installed."""
    try:
        import onnx
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed
    except ImportError as exc:
        raise DeviceError(
            "fixed-shape variants need the onnx package on this computer",
            hint="pip install onnx (or install snapgen-studio[train])",
        ) from exc
    digest = sha256 or hash_file(onnx_path)
    tag = "_".join(f"{name}-{'x'.join(str(int(d)) for d in dims)}" for name, dims in sorted(shapes.items()))
    target = prepared_dir() / digest / "fixed" / tag / onnx_path.name
    if target.is_file():
        return target
    model = onnx.load(str(onnx_path))
    inputs = {i.name for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:  # an optional input this export does not have (pooled_text)
            continue
        try:
            make_input_shape_fixed(model.graph, name, [int(d) for d in dims])
        except ValueError as exc:  # e.g. a static export whose size differs from the one asked for
            raise DeviceError(
                f"cannot fix {onnx_path.name}'s input {name} to {list(dims)}: {exc}",
                hint="this model was exported with fixed shapes; profile it at its own size, without --fixed-shapes",
            ) from None
    fix_output_shapes(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(target)
    return target


# -- pushing ---------------------------------------------------------------------------------------


_SECTION = "@@snapgen-section@@"


def _probe(
    transport: Transport, files_dir: str, paths: Sequence[str]
) -> tuple[dict[str, dict[str, object]], dict[str, int], int | None]:
    """One remote command (each command costs a round trip and an SSH session): create the folder,
    read the device manifest, the sizes of ``paths`` that exist, and ``df -k`` of the folder.
    Returns (manifest files, sizes by path, free bytes or None when df failed)."""
    sizes_script = "; ".join(
        f"[ -f {quote(p)} ] && printf '%s\\t%s\\n' \"$(wc -c < {quote(p)})\" {quote(p)}" for p in paths
    )
    script = (
        f"mkdir -p {quote(files_dir)} || exit 1; cat {quote(files_dir + '/' + REMOTE_MANIFEST)} 2>/dev/null; "
        f"echo {_SECTION}; {sizes_script + '; ' if sizes_script else ''}echo {_SECTION}; df -k {quote(files_dir)}"
    )
    result = transport.run(script, timeout=60)
    if result.returncode != 0 and _SECTION not in result.stdout:
        raise DeviceError(
            f"{transport.target}: cannot create or inspect {files_dir}: {(result.stderr or result.stdout).strip()[:200]}",
            hint="choose a writable folder with --remote-dir",
        )
    parts = result.stdout.split(_SECTION + "\n")
    parts += [""] * (3 - len(parts))
    manifest: dict[str, dict[str, object]] = {}
    try:
        raw = json.loads(parts[0]) if parts[0].strip() else {}
        manifest = raw.get("files", {}) if isinstance(raw, dict) else {}
    except json.JSONDecodeError:
        log.info("%s: ignoring a damaged device manifest", transport.target)
    sizes = {}
    for line in parts[1].splitlines():
        size, _, path = line.partition("\t")
        if size.strip().isdigit():
            sizes[path] = int(size.strip())
    try:
        free = parse_df_available(parts[2])
    except DeviceError:
        free = None
    return manifest, sizes, free


def sync_files(
    transport: Transport,
    files: Sequence[LocalFile],
    *,
    cancel: CancelCheck | None = None,
    on_push: Callable[[str, int, int], None] | None = None,
    timeout: float = 1800.0,
) -> SyncReport:
    """Place ``files`` in ``<workdir>/files/`` on the device, pushing only what is not there yet.

    ``on_push(name, index, count)`` before each push. Raises DeviceError when the device lacks the
    space (names how much is needed and free), Cancelled when ``cancel`` fires between files.
    """
    files_dir = transport.path(REMOTE_FILES_DIR)
    remote = {f.name: f"{files_dir}/{f.name}" for f in files}
    manifest, sizes, free = _probe(transport, files_dir, list(remote.values()))
    todo, reused = [], []
    for f in files:
        entry = manifest.get(f.name, {})
        if entry.get("sha256") == f.sha256 and sizes.get(remote[f.name]) == f.size:
            reused.append(f.name)
        else:
            todo.append(f)
    need = sum(f.size for f in todo)
    if todo:
        if free is None:
            free = transport.free_bytes(files_dir)  # says why df failed
        if free < need + STORAGE_MARGIN_BYTES:
            raise DeviceError(
                f"not enough storage on {transport.target}: the models need {need / 2**20:.1f} MiB "
                f"(+{STORAGE_MARGIN_BYTES // 2**20} MiB headroom), {free / 2**20:.1f} MiB free in {files_dir}",
                hint="free space on the device, or choose a folder on a larger partition with --remote-dir",
            )
    for index, f in enumerate(todo):
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")
        if on_push is not None:
            on_push(f.name, index, len(todo))
        if "/" in f.name:
            transport.ensure_dir(remote[f.name].rsplit("/", 1)[0])
        manifest.pop(f.name, None)  # never claim a file that is half-written
        transport.push(str(f.path), remote[f.name], timeout=timeout, cancel=cancel)
        manifest[f.name] = {"sha256": f.sha256, "size": f.size}
        _write_remote_manifest(transport, files_dir, manifest)
    return SyncReport(remote, tuple(f.name for f in todo), tuple(reused), need)


def _write_remote_manifest(transport: Transport, files_dir: str, manifest: Mapping[str, object]) -> None:
    with tempfile.TemporaryDirectory() as work:
        local = Path(work) / REMOTE_MANIFEST
        local.write_text(
            json.dumps({"format_version": 1, "files": manifest}, indent=1, sort_keys=True), encoding="utf-8"
        )
        transport.push(str(local), f"{files_dir}/{REMOTE_MANIFEST}", timeout=60)

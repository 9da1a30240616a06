"""Import a local model folder or ``.zip`` into the registry.

A folder is validated in place (runtime bundle with ``bundle.json`` and/or diffusers checkpoint with
``model_index.json``; no pickles, no symlink leaving it, plausible ONNX/safetensors headers, bundle
hashes verified), then copied into ``<home>/models/<name>/`` or linked there (``link=True``).

A zip is checked entry by entry *before* anything is written: names that are absolute, contain
``..``, backslashes or drive letters (zip-slip), symlink entries, and pickle files are refused and
named. It is then extracted into a staging folder (a single top-level folder is unwrapped), validated
like a folder, and moved into place with one rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

from model_store.bundle import MANIFEST_NAME, check_relative_path, is_pickle_name, read_manifest
from model_store.errors import (
    DISK_FULL_ERRNOS,
    InvalidModelError,
    NotEnoughSpaceError,
    StoreCancelled,
    StoreError,
    UnsafeFileError,
)
from model_store.registry import CHECKPOINT_INDEX, ModelSource, RegisteredModel, Registry, name_from

log = logging.getLogger(__name__)
_COPY_CHUNK = 1 << 20


def import_model(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    link: bool = False,
    overwrite: bool = False,
    registry: Registry | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RegisteredModel:
    """Import a model folder or ``.zip`` and register it (source ``import``).

    ``name`` defaults to the bundle's name, else the folder/zip name. ``link`` keeps the files where
    they are (folders only). Raises a StoreError subclass naming what is wrong; on any failure the
    registry and the models already installed are unchanged.
    """
    registry = registry if registry is not None else Registry()
    src = Path(path).expanduser()
    if not src.exists():
        raise InvalidModelError(
            f"{src} does not exist", hint="give the path of a model folder or a .zip file"
        )
    source = ModelSource(type="import", request=str(src.resolve()))
    try:
        return _import(src, name, link, overwrite, registry, source, cancel)
    except OSError as exc:  # the disk filled, a file could not be read, no symlink privilege...
        kind = NotEnoughSpaceError if exc.errno in DISK_FULL_ERRNOS else StoreError
        raise kind(
            f"importing {src} failed: {exc}",
            hint="nothing was installed; free some disk space or check the files, then import again",
        ) from None


def _import(
    src: Path,
    name: str | None,
    link: bool,
    overwrite: bool,
    registry: Registry,
    source: ModelSource,
    cancel: Callable[[], bool] | None,
) -> RegisteredModel:
    if src.is_dir():
        model_name = name or _default_name(src, src.name)
        return registry.install(src, model_name, source=source, link=link, overwrite=overwrite)
    if not zipfile.is_zipfile(src):
        raise InvalidModelError(
            f"{src} is neither a folder nor a .zip archive", hint="zip the model folder first"
        )
    if link:
        raise InvalidModelError("--link works with folders only; a zip is always extracted")
    staging = registry.new_staging_dir("import")
    try:
        root = extract_zip_safely(src, staging, cancel=cancel)
        model_name = name or _default_name(root, src.stem)
        return registry.install(root, model_name, source=source, move=True, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _default_name(folder: Path, fallback: str) -> str:
    if (folder / MANIFEST_NAME).is_file():
        try:
            return name_from(read_manifest(folder).name)
        except Exception:  # a bad manifest is reported by validation, with its own message
            pass
    return name_from(fallback)


def check_zip_entries(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Return the archive's file entries after refusing zip-slip names, symlinks and pickles.

    Every offending entry is named in one error. Directory entries are dropped from the result.
    """
    unsafe, links, pickles = [], [], []
    for info in archive.infolist():
        try:
            check_relative_path(info.filename.rstrip("/") if info.is_dir() else info.filename, "zip entry")
        except UnsafeFileError:
            unsafe.append(info.filename)
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            target = archive.read(info).decode("utf-8", "replace")
            links.append(f"{info.filename} -> {target}")
        elif is_pickle_name(info.filename):
            pickles.append(info.filename)
    if unsafe:
        raise UnsafeFileError(
            f"the archive has entries that would land outside the target folder: {unsafe}",
            hint="this archive is unsafe; re-create it with relative paths only",
            files=tuple(unsafe),
        )
    if links:
        raise UnsafeFileError(
            f"the archive holds symlinks, which are refused: {links}",
            hint="re-create the archive with the files themselves",
            files=tuple(link.split(" -> ")[0] for link in links),
        )
    if pickles:
        raise UnsafeFileError(
            f"pickle files are refused (they can run code when loaded): {pickles}",
            hint="convert them to .safetensors or ONNX and remove them from the archive",
            files=tuple(pickles),
        )
    return [info for info in archive.infolist() if not info.is_dir()]


def extract_zip_safely(
    zip_path: str | os.PathLike[str], dest: Path, *, cancel: Callable[[], bool] | None = None
) -> Path:
    """Extract a checked archive into ``dest``; return the model root (``dest`` or its single top folder)."""
    with zipfile.ZipFile(zip_path) as archive:
        entries = check_zip_entries(archive)
        needed = sum(info.file_size for info in entries)
        free = shutil.disk_usage(dest).free
        if needed > free:
            raise NotEnoughSpaceError(
                f"extracting {zip_path} needs {needed} bytes but {dest} has {free} bytes free",
                hint="free some disk space or set SNAPGEN_HOME to a larger disk",
            )
        base = dest.resolve()
        for info in entries:
            target = (dest / info.filename).resolve()
            if base not in target.parents:  # belt and braces after check_relative_path
                raise UnsafeFileError(
                    f"zip entry {info.filename!r} leaves the target folder", files=(info.filename,)
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    if cancel is not None and cancel():
                        raise StoreCancelled("import cancelled")
                    out.write(chunk)
    return _model_root(dest)


def _model_root(dest: Path) -> Path:
    """``dest`` when it holds bundle.json/model_index.json, else its only subfolder if that does."""
    markers = (MANIFEST_NAME, CHECKPOINT_INDEX)
    if any((dest / m).is_file() for m in markers):
        return dest
    children = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    if len(children) == 1 and children[0].is_dir() and any((children[0] / m).is_file() for m in markers):
        return children[0]
    raise InvalidModelError(
        "the archive holds neither a runtime bundle nor a diffusers checkpoint",
        hint=f"put {MANIFEST_NAME} or {CHECKPOINT_INDEX} at the top of the archive (or in its single top folder)",
    )

"""The local model registry: ``<home>/registry.json`` indexing the folders under ``<home>/models/``.

* Each installed model is a folder ``<home>/models/<name>/`` (or a symlink to one, for linked
  imports) holding a runtime bundle (``bundle.json``), a diffusers-layout checkpoint
  (``model_index.json``) or both.
* The index is written atomically (temp file + ``os.replace``) while holding an exclusive lock on
  ``<home>/registry.lock`` (``fcntl.flock``; ``msvcrt.locking`` on Windows), so two processes
  registering at once both succeed and readers always see a complete file.
* A folder is moved into ``models/`` with one ``rename`` from ``<home>/staging/`` after it has been
  fully validated, so a failed download or import never leaves a half-installed model and never
  touches the models already there.
* Built-in models (``model_store/builtin/<name>/bundle.json``) are listed from the package folder on
  every read: always present, source ``builtin``, not removable.
* If ``registry.json`` is unreadable it is set aside (``registry.json.corrupt-<time>``) and rebuilt
  from the folders on disk (``repair``), so the store always loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model_store import paths
from model_store.bundle import (
    MANIFEST_NAME,
    FileCheck,
    check_model_file,
    check_model_files,
    installed_precisions,
    list_files,
    read_manifest,
    refuse_pickles,
    verify_bundle,
    verify_or_raise,
)
from model_store.errors import (
    BadRequestError,
    InvalidModelError,
    ModelExistsError,
    ModelNotFoundError,
    NotEnoughSpaceError,
    ProtectedModelError,
    RegistryError,
    StoreError,
    UnsafeFileError,
)

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
INDEX_NAME = "registry.json"
LOCK_NAME = "registry.lock"
DEFAULT_MODEL = "snapgen-emoji"
LOCK_TIMEOUT_S = 60.0
CHECKPOINT_INDEX = "model_index.json"

SourceType = Literal["hub", "import", "trained", "builtin"]
ModelKind = Literal["bundle", "checkpoint", "both"]
SOURCE_TYPES: tuple[str, ...] = ("hub", "import", "trained", "builtin")
MODEL_KINDS: tuple[str, ...] = ("bundle", "checkpoint", "both")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (lowercase letters, digits, ``. _ -``; max 64)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith((".", "-")):
        raise BadRequestError(
            f"invalid model name {name!r}",
            hint="use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def name_from(text: str) -> str:
    """Derive a valid model name from a repo id, folder or file name (``Org/My Model`` -> ``my-model``)."""
    stem = text.rstrip("/").split("/")[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip(".-_")
    return validate_name(slug[:64].rstrip(".-") or "model")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------------
# entries


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from. ``revision`` is the pinned commit hash for hub downloads; ``request``
    is what the user asked for (hub: the revision string; import: the original path; trained: the
    training request as a dict)."""

    type: SourceType
    repo: str | None = None
    revision: str | None = None
    request: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> ModelSource:
        data = _strict(raw, "source", ("type",), ("repo", "revision", "request"))
        if data["type"] not in SOURCE_TYPES:
            raise RegistryError(f"registry: source.type {data['type']!r} is not one of {list(SOURCE_TYPES)}")
        return cls(
            type=data["type"],
            repo=data.get("repo"),
            revision=data.get("revision"),
            request=data.get("request"),
        )


@dataclass(frozen=True)
class RegisteredModel:
    """One installed model. ``path`` is absolute; ``variants`` are the precisions whose files are all
    present (bundles only); ``size_bytes`` counts the folder's files; ``created`` is ISO 8601 UTC."""

    name: str
    kind: ModelKind
    path: Path
    source: ModelSource
    variants: tuple[str, ...] = ()
    size_bytes: int = 0
    created: str = ""
    license: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.source.type == "builtin"

    @property
    def has_bundle(self) -> bool:
        return self.kind in ("bundle", "both")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``path`` as a string), as stored in the index and printed by ``--json``."""
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["variants"] = list(self.variants)
        data["source"] = self.source.to_dict()
        return data

    @classmethod
    def from_dict(cls, raw: object, *, base: Path | None = None) -> RegisteredModel:
        """Parse an index entry; a relative ``path`` is taken relative to ``base`` (the store home)."""
        keys = ("name", "kind", "path", "source", "variants", "size_bytes", "created")
        data = _strict(raw, "entry", keys, ("license",))
        if data["kind"] not in MODEL_KINDS:
            raise RegistryError(f"registry: kind {data['kind']!r} is not one of {list(MODEL_KINDS)}")
        path = Path(data["path"])
        if not path.is_absolute() and base is not None:
            path = base / path
        variants = data["variants"]
        if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
            raise RegistryError(f"registry: variants of {data['name']!r} must be a list of strings")
        return cls(
            name=validate_name(data["name"]),
            kind=data["kind"],
            path=path,
            source=ModelSource.from_dict(data["source"]),
            variants=tuple(variants),
            size_bytes=int(data["size_bytes"]),
            created=str(data["created"]),
            license=data.get("license"),
        )


def _strict(raw: object, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(raw, dict):
        raise RegistryError(f"registry: {where} must be an object")
    unknown = sorted(set(raw) - set(required) - set(optional))
    missing = [k for k in required if k not in raw]
    if unknown or missing:
        raise RegistryError(f"registry: {where} has unknown keys {unknown} / missing keys {missing}")
    return raw


@dataclass(frozen=True)
class RepairReport:
    """What ``Registry.repair`` changed: names added from disk, dropped (folder gone), refreshed."""

    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    refreshed: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# validating a model folder


@dataclass(frozen=True)
class FolderInfo:
    """What ``inspect_model_folder`` found: kind, complete bundle precisions, license, byte size."""

    kind: ModelKind
    variants: tuple[str, ...]
    license: str | None
    size_bytes: int


def inspect_model_folder(folder: str | os.PathLike[str], *, verify: bool = True) -> FolderInfo:
    """Validate a folder as a runtime bundle and/or a diffusers checkpoint; raise a StoreError if not.

    Checks: no pickle files (all named), no symlink leaving the folder, every ONNX/safetensors header
    plausible, and for bundles a full sha256 verification of the complete variants (``verify``).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidModelError(f"{root} is not a folder", hint="give the path of a model folder or a .zip")
    check_no_escaping_symlinks(root)
    names = list_files(root)
    refuse_pickles(root, names)
    check_model_files(root, names)
    has_bundle = (root / MANIFEST_NAME).is_file()
    has_checkpoint = (root / CHECKPOINT_INDEX).is_file()
    if not (has_bundle or has_checkpoint):
        raise InvalidModelError(
            f"{root} is neither a runtime bundle nor a diffusers checkpoint",
            hint=f"a bundle has {MANIFEST_NAME}; a checkpoint has {CHECKPOINT_INDEX} with one subfolder per component",
        )
    variants: tuple[str, ...] = ()
    license_name: str | None = None
    if has_bundle:
        manifest = read_manifest(root)
        variants = installed_precisions(root, manifest)
        if not variants:
            raise InvalidModelError(
                f"{root}: no precision variant of the bundle is complete (listed: {list(manifest.precisions)})",
                hint="copy or download the missing ONNX files",
            )
        if verify:
            verify_or_raise(root, precisions=variants)
        license_name = manifest.license
    if has_checkpoint:
        check_checkpoint_layout(root)
    kind: ModelKind = "both" if has_bundle and has_checkpoint else ("bundle" if has_bundle else "checkpoint")
    size = sum((root / n).stat().st_size for n in names)
    return FolderInfo(kind=kind, variants=variants, license=license_name, size_bytes=size)


def check_checkpoint_layout(root: Path) -> None:
    """A diffusers layout: ``model_index.json`` names components, each a subfolder with a config and
    safetensors weights (tokenizers and schedulers have no weights)."""
    try:
        index = json.loads((root / CHECKPOINT_INDEX).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidModelError(f"{root / CHECKPOINT_INDEX} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise InvalidModelError(f"{root / CHECKPOINT_INDEX} must hold a JSON object")
    components = [
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    ]
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise InvalidModelError(f"{root}: components {missing} named in {CHECKPOINT_INDEX} have no folder")
    if not any(name.endswith(".safetensors") for name in list_files(root)):
        raise InvalidModelError(
            f"{root}: the checkpoint has no .safetensors weights",
            hint="pickle weights are refused; convert them",
        )


def check_no_escaping_symlinks(root: Path) -> None:
    """Raise UnsafeFileError for any symlink under ``root`` whose target lies outside ``root``."""
    base = root.resolve()
    escaping = []
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            path = Path(dirpath) / entry
            if path.is_symlink():
                target = path.resolve()
                if target != base and base not in target.parents:
                    escaping.append(f"{path.relative_to(root).as_posix()} -> {os.readlink(path)}")
    if escaping:
        raise UnsafeFileError(
            f"symlinks leaving {root} are refused: {escaping}",
            hint="replace them with the files themselves",
            files=tuple(e.split(" -> ")[0] for e in escaping),
        )


# ----------------------------------------------------------------------------------------------
# the lock


@contextlib.contextmanager
def _file_lock(lock_path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive inter-process lock on ``lock_path`` (fcntl.flock; msvcrt.locking on Windows)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+b")  # noqa: SIM115 - held for the whole block
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                _lock_fd(handle.fileno())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another process holds {lock_path} for more than {timeout_s:.0f} s",
                        hint="wait for the other download/import to finish, or delete the lock file if none runs",
                    ) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            _unlock_fd(handle.fileno())
    finally:
        handle.close()


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# the registry


class _CopyFailed(Exception):
    """An OSError of one file, carried past ``shutil.copytree`` (which would collect every file's
    error and go on copying onto a full disk) so the copy stops at the first failure."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _copy_or_stop(src: str, dst: str) -> str:
    try:
        return shutil.copy2(src, dst)
    except OSError as exc:
        raise _CopyFailed(exc) from exc


class Registry:
    """The index of installed models under ``home`` (default: ``paths.store_home()``).

    Reads need no lock (the index is replaced atomically); every write takes the file lock and
    re-reads the index inside it, so concurrent writers never lose each other's entries.
    """

    def __init__(
        self, home: str | os.PathLike[str] | None = None, *, builtin_dir: Path | None = None
    ) -> None:
        self.home = Path(home) if home is not None else paths.store_home()
        self.builtin_dir = builtin_dir if builtin_dir is not None else paths.builtin_dir()

    # -- locations ---------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    @property
    def index_path(self) -> Path:
        return self.home / INDEX_NAME

    def model_dir(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    def new_staging_dir(self, label: str) -> Path:
        """A fresh empty folder under ``staging/`` (same filesystem as ``models/``, so rename works)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.staging_dir))

    # -- reading -----------------------------------------------------------------------------

    def builtin_models(self) -> list[RegisteredModel]:
        """Every ``builtin/<name>/bundle.json`` as a RegisteredModel (no hashing)."""
        found = []
        if not self.builtin_dir.is_dir():
            return found
        for folder in sorted(p for p in self.builtin_dir.iterdir() if (p / MANIFEST_NAME).is_file()):
            try:
                manifest = read_manifest(folder)
                name = validate_name(folder.name)
            except StoreError as exc:
                log.warning("built-in model %s is unusable: %s", folder, exc)
                continue
            found.append(
                RegisteredModel(
                    name=name,
                    kind="bundle",
                    path=folder,
                    source=ModelSource(type="builtin"),
                    variants=installed_precisions(folder, manifest),
                    size_bytes=manifest.total_size,
                    created=manifest.provenance.created,
                    license=manifest.license,
                )
            )
        return found

    def _entries(self) -> dict[str, RegisteredModel]:
        """The index's entries (no built-ins). An unreadable index is set aside and rebuilt."""
        try:
            return self._read_index()
        except RegistryError as exc:
            log.warning("%s; rebuilding the index from %s", exc, self.models_dir)
            with _file_lock(self.home / LOCK_NAME):
                entries = self._read_or_rebuild_locked()
                self._write_index(entries)
                return entries

    def _read_or_rebuild_locked(self) -> dict[str, RegisteredModel]:
        """Under the lock: the index's entries, or (unreadable) set it aside and rescan the disk."""
        try:
            return self._read_index()  # another process may have repaired it meanwhile
        except RegistryError:
            backup = self.index_path.with_name(f"{INDEX_NAME}.corrupt-{int(time.time())}")
            os.replace(self.index_path, backup)
            log.warning("set the unreadable index aside as %s", backup)
            return self._scan_disk({})[0]

    def _read_index(self) -> dict[str, RegisteredModel]:
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            raw = json.loads(text)
            data = _strict(raw, "index", ("format_version", "models"))
            if data["format_version"] != INDEX_FORMAT_VERSION:
                raise RegistryError(f"registry: format_version {data['format_version']!r} is not supported")
            models = data["models"]
            if not isinstance(models, dict):
                raise RegistryError("registry: models must be an object")
            return {name: RegisteredModel.from_dict(entry, base=self.home) for name, entry in models.items()}
        except (json.JSONDecodeError, StoreError, TypeError, ValueError) as exc:
            raise RegistryError(f"{self.index_path} is unreadable ({exc})") from exc

    def list(self) -> list[RegisteredModel]:
        """Built-in models, then installed ones, sorted by name. Makes no network call."""
        builtins = self.builtin_models()
        names = {m.name for m in builtins}
        entries = [m for n, m in sorted(self._entries().items()) if n not in names]
        return [*builtins, *entries]

    def get(self, name: str) -> RegisteredModel | None:
        """The model called ``name`` or None."""
        return next((m for m in self.list() if m.name == name), None)

    def names(self) -> list[str]:
        return [m.name for m in self.list()]

    def default_model_name(self) -> str | None:
        """``snapgen-emoji`` when present, else the first installed model, else None."""
        names = self.names()
        if DEFAULT_MODEL in names:
            return DEFAULT_MODEL
        return names[0] if names else None

    def resolve(self, name: str | None = None) -> RegisteredModel:
        """The model called ``name`` (None: the default model), or ModelNotFoundError listing names."""
        if name is None:
            name = self.default_model_name()
            if name is None:
                raise ModelNotFoundError(
                    "no model is installed",
                    hint="download one with `snapgen models download REPO` or import one",
                )
        model = self.get(name)
        if model is None:
            installed = self.names()
            raise ModelNotFoundError(
                f"no model named {name!r} is installed; installed: {installed or 'none'}",
                hint="see `snapgen models list`, or download/import it first",
            )
        if not model.path.exists():
            raise ModelNotFoundError(
                f"model {name!r} is registered but its folder {model.path} is gone",
                hint="run `snapgen models repair` or re-install it",
            )
        return model

    def verify(
        self,
        name: str,
        *,
        progress: Callable[[int, int, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[FileCheck]:
        """Check a model's files: a bundle's installed variants are re-hashed against bundle.json; a
        checkpoint (no hashes of its own) gets its safetensors headers checked (``ok``/``mismatch``)."""
        model = self.resolve(name)
        if model.has_bundle:
            return verify_bundle(
                model.path, precisions=model.variants or None, progress=progress, cancel=cancel
            )
        checks = []
        for rel in list_files(model.path):
            size = (model.path / rel).stat().st_size
            try:
                check_model_file(model.path / rel)
                checks.append(FileCheck(rel, "ok", actual_size=size))
            except StoreError:
                checks.append(FileCheck(rel, "mismatch", actual_size=size))
        return checks

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk per installed model (built-ins included) and ``"total"``."""
        usage = {m.name: _folder_size(m.path) for m in self.list()}
        usage["total"] = sum(usage.values())
        return usage

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, RegisteredModel]]:
        """Hold the lock, yield the current entries for editing, then write them atomically."""
        self.home.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.home / LOCK_NAME):
            entries = self._read_or_rebuild_locked()
            yield entries
            self._write_index(entries)

    def _write_index(self, entries: dict[str, RegisteredModel]) -> None:
        models = {}
        for name, model in sorted(entries.items()):
            data = model.to_dict()
            with contextlib.suppress(ValueError):  # store paths inside home relative, so home can move
                data["path"] = model.path.relative_to(self.home).as_posix()
            models[name] = data
        payload = {"format_version": INDEX_FORMAT_VERSION, "models": models}
        self.home.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=f".{INDEX_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2, sort_keys=True, default=str)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.index_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def install(
        self,
        src: str | os.PathLike[str],
        name: str,
        *,
        source: ModelSource,
        move: bool = False,
        link: bool = False,
        overwrite: bool = False,
        verify: bool = True,
    ) -> RegisteredModel:
        """Validate ``src`` and make it the model ``name``: moved (``move``, e.g. from staging), linked
        (``link``: ``models/<name>`` becomes a symlink to ``src``) or copied, then registered.

        Nothing is changed when validation fails; with ``overwrite`` an existing model is replaced only
        after the new folder is complete (the old one is restored if the swap fails).
        """
        validate_name(name)
        self._refuse_builtin(name)
        src_path = Path(src)
        info = inspect_model_folder(src_path, verify=verify)
        if not overwrite:
            self.ensure_name_free(name)
        staged: Path | None = None
        try:
            if link:
                staged = self.new_staging_dir(name)
                staged.rmdir()
                os.symlink(src_path.resolve(), staged, target_is_directory=True)
            elif move:
                staged = src_path
            else:
                staged = self.new_staging_dir(name)
                shutil.rmtree(staged)
                free = shutil.disk_usage(staged.parent).free
                if info.size_bytes > free:
                    raise NotEnoughSpaceError(
                        f"copying {src_path} needs {info.size_bytes} bytes but {staged.parent} has {free} free",
                        hint="free some disk space, set SNAPGEN_HOME to a larger disk, or import with --link",
                    )
                try:
                    shutil.copytree(src_path, staged, symlinks=False, copy_function=_copy_or_stop)
                except _CopyFailed as failed:
                    raise failed.error from None
        except BaseException:  # a half-made copy or link must not stay in staging
            if not move and staged is not None and (staged.exists() or staged.is_symlink()):
                _remove_path(staged)
            raise
        model = RegisteredModel(
            name=name,
            kind=info.kind,
            path=self.model_dir(name),
            source=source,
            variants=info.variants,
            size_bytes=info.size_bytes,
            created=_now(),
            license=info.license,
        )
        try:
            with self._locked() as entries:
                if not overwrite and (name in entries or self.model_dir(name).exists()):
                    raise ModelExistsError(
                        f"a model named {name!r} is already installed",
                        hint="pick another --name or remove it first",
                    )
                self._swap_in(staged, self.model_dir(name))
                entries[name] = model
        except BaseException:
            if not move and (staged.exists() or staged.is_symlink()):
                _remove_path(staged)
            raise
        return model

    def register(self, model: RegisteredModel) -> RegisteredModel:
        """Add or replace the index entry of a folder that is already in place (``model.path``)."""
        validate_name(model.name)
        self._refuse_builtin(model.name)
        if not model.path.exists():
            raise InvalidModelError(f"cannot register {model.name!r}: {model.path} does not exist")
        with self._locked() as entries:
            entries[model.name] = model
        return model

    def remove(self, name: str) -> RegisteredModel:
        """Delete an installed model's folder (a linked import loses only its link) and its entry."""
        self._refuse_builtin(name)
        with self._locked() as entries:
            model = entries.get(name)
            folder = self.model_dir(name)
            if model is None and not folder.exists() and not folder.is_symlink():
                raise ModelNotFoundError(
                    f"no model named {name!r} is installed; installed: {self.names() or 'none'}",
                    hint="see `snapgen models list`",
                )
            # rename first so that the name is free at once even if deleting a big folder is slow
            if folder.exists() or folder.is_symlink():
                trash = self.staging_dir / f".removed-{name}-{uuid.uuid4().hex[:8]}"
                self.staging_dir.mkdir(parents=True, exist_ok=True)
                os.replace(folder, trash)
                _remove_path(trash)
            entries.pop(name, None)
        return model or RegisteredModel(
            name=name, kind="bundle", path=folder, source=ModelSource(type="import")
        )

    def repair(self) -> RepairReport:
        """Make the index match the disk: drop entries whose folder vanished, add folders under
        ``models/`` that hold a valid model, refresh variants/size of the others (no hashing)."""
        with self._locked() as entries:
            fresh, report = self._scan_disk(entries)
            entries.clear()
            entries.update(fresh)
        if self.staging_dir.is_dir():  # leftovers of removals/replacements interrupted by a crash
            for leftover in self.staging_dir.glob(".re*-*"):
                _remove_path(leftover)
        return report

    def _scan_disk(
        self, entries: dict[str, RegisteredModel]
    ) -> tuple[dict[str, RegisteredModel], RepairReport]:
        fresh: dict[str, RegisteredModel] = {}
        added, dropped, refreshed, skipped = [], [], [], {}
        for name, model in entries.items():
            if not model.path.exists():
                dropped.append(name)
        folders = sorted(p for p in self.models_dir.iterdir()) if self.models_dir.is_dir() else []
        for folder in folders:
            try:
                name = validate_name(folder.name)
                info = inspect_model_folder(folder, verify=False)
            except StoreError as exc:
                skipped[folder.name] = str(exc)
                continue
            old = entries.get(name)
            source = old.source if old is not None else ModelSource(type="import", request=str(folder))
            fresh[name] = RegisteredModel(
                name=name,
                kind=info.kind,
                path=self.model_dir(name),
                source=source,
                variants=info.variants,
                size_bytes=info.size_bytes,
                created=old.created if old is not None else _now(),
                license=info.license,
            )
            (refreshed if old is not None else added).append(name)
        for name in entries:
            if name not in fresh and name not in dropped:
                dropped.append(name)
        report = RepairReport(tuple(added), tuple(sorted(dropped)), tuple(refreshed), skipped)
        return fresh, report

    # -- helpers -----------------------------------------------------------------------------

    def _refuse_builtin(self, name: str) -> None:
        if any(m.name == name for m in self.builtin_models()):
            raise ProtectedModelError(
                f"{name!r} is the built-in model; it cannot be removed or replaced",
                hint="pick another name",
            )

    def ensure_name_free(self, name: str) -> None:
        """Raise ModelExistsError (or ProtectedModelError for a built-in) when ``name`` is taken."""
        validate_name(name)
        self._refuse_builtin(name)
        if name in self._entries() or self.model_dir(name).exists():
            raise ModelExistsError(
                f"a model named {name!r} is already installed",
                hint="pick another name (--name), or remove it first with `snapgen models remove`",
            )

    def _swap_in(self, staged: Path, target: Path) -> None:
        """Rename ``staged`` to ``target``; an existing target is set aside and restored on failure."""
        target.parent.mkdir(parents=True, exist_ok=True)
        backup = None
        if target.exists() or target.is_symlink():
            backup = self.staging_dir / f".replaced-{target.name}-{uuid.uuid4().hex[:8]}"
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            os.replace(target, backup)
        try:
            os.replace(staged, target)
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
            raise
        if backup is not None:
            _remove_path(backup)


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _folder_size(path: Path) -> int:
    try:
        return sum((path / n).stat().st_size for n in list_files(path))
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------
# module-level conveniences on the default home


def default_registry() -> Registry:
    """The registry at ``$SNAPGEN_HOME`` or the platformdirs data folder."""
    return Registry()


def resolve(name: str | None = None, *, home: str | os.PathLike[str] | None = None) -> RegisteredModel:
    """Shortcut for ``Registry(home).resolve(name)``; None resolves the default model."""
    return Registry(home).resolve(name)


def list_models(*, home: str | os.PathLike[str] | None = None) -> list[RegisteredModel]:
    """Shortcut for ``Registry(home).list()``."""
    return Registry(home).list()


def default_model_name(*, home: str | os.PathLike[str] | None = None) -> str | None:
    """Shortcut for ``Registry(home).default_model_name()``."""
    return Registry(home).default_model_name()

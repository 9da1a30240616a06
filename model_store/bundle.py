"""The runtime bundle: a directory of fixed file names plus ``bundle.json`` (format_version 1).

Layout (see /tmp/team brief and DESIGN.md)::

    bundle.json                      this manifest
    tokenizer.json, tokenizer_1.json one tokenizer per text encoder
    text_encoder.onnx, ...           text encoders (a variant may name text_encoder.<precision>.onnx)
    unet.<precision>.onnx            precision in {fp32, fp16, int8}
    decoder.<precision>.onnx

``bundle.json`` records the model config, defaults, the precision variants present, provenance,
license and the sha256 + size of every other file of the bundle. ``read_manifest`` parses it strictly
(unknown keys are an error; ``model.unet``/``model.decoder`` are opaque dicts here and are validated by
``snapgen_app.config``), ``write_manifest`` hashes the folder and writes it atomically, and
``verify_bundle``/``verify_or_raise`` re-hash the files against it.

Safety: pickle files (``.bin .ckpt .pt .pth .pkl .pickle``) are refused anywhere in a bundle, and
never opened. ``check_safetensors_header`` and ``check_onnx_file`` look at the first bytes of a file
without importing safetensors or onnx.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from model_store.errors import IntegrityError, ManifestError, StoreCancelled, UnsafeFileError

FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HASH_CHUNK_BYTES = 1 << 20

#: ``progress(done_bytes, total_bytes, current_relative_path)``
VerifyProgress = Callable[[int, int, str], None]
#: ``cancel() -> True`` stops the operation at the next chunk (raises StoreCancelled).
CancelCheck = Callable[[], bool]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FileStatus = Literal["ok", "missing", "mismatch", "unexpected"]


# ----------------------------------------------------------------------------------------------
# small strict-JSON helpers


def _check_keys(raw: object, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
    """Return ``raw`` as a dict after checking it has every required key and no unknown one."""
    if not isinstance(raw, dict):
        raise ManifestError(f"bundle.json: {where} must be an object, got {type(raw).__name__}")
    required = tuple(required)
    allowed = set(required) | set(optional)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ManifestError(
            f"bundle.json: unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}",
            hint="the bundle was written by another tool or a newer version; re-export it",
        )
    missing = [key for key in required if key not in raw]
    if missing:
        raise ManifestError(f"bundle.json: {where} is missing key(s) {missing}")
    return raw


def _int(raw: object, where: str, *, minimum: int = 0) -> int:
    # bool is an int subclass; true/false where a count is expected is a mistake
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < minimum:
        raise ManifestError(f"bundle.json: {where} must be an integer >= {minimum}, got {raw!r}")
    return raw


def _float(raw: object, where: str) -> float:
    if not isinstance(raw, (int, float)) or isinstance(raw, bool):
        raise ManifestError(f"bundle.json: {where} must be a number, got {raw!r}")
    return float(raw)


def _str(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ManifestError(f"bundle.json: {where} must be a non-empty string, got {raw!r}")
    return raw


def _bool(raw: object, where: str) -> bool:
    if not isinstance(raw, bool):
        raise ManifestError(f"bundle.json: {where} must be true or false, got {raw!r}")
    return raw


def _dict(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ManifestError(f"bundle.json: {where} must be an object, got {type(raw).__name__}")
    return dict(raw)


def _str_list(raw: object, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"bundle.json: {where} must be a list of strings, got {raw!r}")
    return tuple(_str(item, f"{where}[{i}]") for i, item in enumerate(raw))


def check_relative_path(name: str, where: str = "path") -> str:
    """Return ``name`` if it is a safe relative POSIX path inside a folder, else raise UnsafeFileError.

    Refuses absolute paths, drive letters, backslashes, empty parts and ``..`` so that no manifest,
    Hub listing or archive entry can name a file outside the folder it describes.
    """
    pure = PurePosixPath(name)
    bad = (
        not name
        or "\\" in name
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in name.split("/"))
        or pure.is_absolute()
    )
    if bad:
        raise UnsafeFileError(
            f"{where}: {name!r} is not a plain relative path inside the folder",
            hint="paths must not be absolute or contain '..'",
            files=(name,),
        )
    return name


def is_pickle_name(name: str) -> bool:
    """True when the file name has a pickle extension (.bin .ckpt .pt .pth .pkl .pickle)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# the manifest


NULL_CONDITIONS = ("empty_prompt", "zeros")
# Generation defaults (steps, size, shift, guidance) in a training checkpoint's model_index.json.
CHECKPOINT_DEFAULTS_KEY = "_snapgen_defaults"


def _recorded_default(model_index: dict[str, Any], key: str) -> float | None:
    """A number under ``_snapgen_defaults`` in a checkpoint's model_index.json, or None."""
    defaults = model_index.get(CHECKPOINT_DEFAULTS_KEY)
    value = defaults.get(key) if isinstance(defaults, dict) else None
    return float(value) if isinstance(value, int | float) else None


def recorded_shift(model_index: dict[str, Any]) -> float | None:
    """The timestep shift a checkpoint's model_index.json records, or None when it records none
    (absent, or not a positive number)."""
    value = _recorded_default(model_index, "shift")
    return value if value is not None and value > 0 else None


def recorded_guidance(model_index: dict[str, Any]) -> float | None:
    """The classifier-free guidance a checkpoint's model_index.json records as its default, or None
    (absent, or below 1)."""
    value = _recorded_default(model_index, "guidance_scale")
    return value if value is not None and value >= 1.0 else None


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: its default ONNX file, its tokenizer file and its output sizes."""

    file: str
    tokenizer: str
    max_length: int
    pad_to_max_length: bool
    hidden_size: int
    pooled_size: int

    @classmethod
    def from_dict(cls, raw: object, where: str) -> TextEncoderSpec:
        keys = ("file", "tokenizer", "max_length", "pad_to_max_length", "hidden_size", "pooled_size")
        data = _check_keys(raw, where, keys)
        return cls(
            file=check_relative_path(_str(data["file"], f"{where}.file"), f"{where}.file"),
            tokenizer=check_relative_path(
                _str(data["tokenizer"], f"{where}.tokenizer"), f"{where}.tokenizer"
            ),
            max_length=_int(data["max_length"], f"{where}.max_length", minimum=1),
            pad_to_max_length=_bool(data["pad_to_max_length"], f"{where}.pad_to_max_length"),
            hidden_size=_int(data["hidden_size"], f"{where}.hidden_size", minimum=1),
            pooled_size=_int(data["pooled_size"], f"{where}.pooled_size", minimum=0),
        )


@dataclass(frozen=True)
class ModelSpec:
    """``bundle.json["model"]``. ``unet``/``decoder`` are the config dicts of snapgen_app.config.

    ``null_condition`` is the unconditional input of classifier-free guidance, the text dropout the
    model was trained with: ``empty_prompt`` (the encoders' output for "") or ``zeros`` (all-zero
    tokens and pooled vector). Optional in the file; absent means ``empty_prompt``.
    """

    unet: dict[str, Any]
    decoder: dict[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_channels: int
    vae_scale_factor: int
    null_condition: str = "empty_prompt"

    @classmethod
    def from_dict(cls, raw: object) -> ModelSpec:
        keys = ("unet", "decoder", "text_encoders", "latent_channels", "vae_scale_factor")
        data = _check_keys(raw, "model", keys, optional=("null_condition",))
        encoders = data["text_encoders"]
        if not isinstance(encoders, list):
            raise ManifestError("bundle.json: model.text_encoders must be a list")
        null_condition = data.get("null_condition", "empty_prompt")
        if null_condition not in NULL_CONDITIONS:
            raise ManifestError(
                f"bundle.json: model.null_condition must be one of {list(NULL_CONDITIONS)}, "
                f"got {null_condition!r}"
            )
        return cls(
            unet=_dict(data["unet"], "model.unet"),
            decoder=_dict(data["decoder"], "model.decoder"),
            text_encoders=tuple(
                TextEncoderSpec.from_dict(item, f"model.text_encoders[{i}]")
                for i, item in enumerate(encoders)
            ),
            latent_channels=_int(data["latent_channels"], "model.latent_channels", minimum=1),
            vae_scale_factor=_int(data["vae_scale_factor"], "model.vae_scale_factor", minimum=1),
            null_condition=null_condition,
        )


@dataclass(frozen=True)
class Defaults:
    """Default generation settings stored with the model."""

    steps: int
    width: int
    height: int
    shift: float
    guidance_scale: float

    @classmethod
    def from_dict(cls, raw: object) -> Defaults:
        data = _check_keys(raw, "defaults", ("steps", "width", "height", "shift", "guidance_scale"))
        return cls(
            steps=_int(data["steps"], "defaults.steps", minimum=1),
            width=_int(data["width"], "defaults.width", minimum=1),
            height=_int(data["height"], "defaults.height", minimum=1),
            shift=_float(data["shift"], "defaults.shift"),
            guidance_scale=_float(data["guidance_scale"], "defaults.guidance_scale"),
        )


@dataclass(frozen=True)
class Variant:
    """The files of one precision. ``parity`` holds the export check, e.g. {"metric": "psnr", "value": 41.2,
    "threshold": 30.0}; ``kept_in_higher_precision`` names ONNX nodes left in fp32 by quantization."""

    unet: str
    decoder: str
    text_encoder: tuple[str, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    kept_in_higher_precision: tuple[str, ...] = ()

    @property
    def model_files(self) -> tuple[str, ...]:
        """The ONNX files of this variant: text encoders, UNet, decoder."""
        return (*self.text_encoder, self.unet, self.decoder)

    @classmethod
    def from_dict(cls, raw: object, where: str) -> Variant:
        data = _check_keys(
            raw, where, ("unet", "decoder", "text_encoder"), ("parity", "kept_in_higher_precision")
        )
        names = _str_list(data["text_encoder"], f"{where}.text_encoder")
        return cls(
            unet=check_relative_path(_str(data["unet"], f"{where}.unet"), f"{where}.unet"),
            decoder=check_relative_path(_str(data["decoder"], f"{where}.decoder"), f"{where}.decoder"),
            text_encoder=tuple(check_relative_path(n, f"{where}.text_encoder") for n in names),
            parity=_dict(data.get("parity", {}), f"{where}.parity"),
            kept_in_higher_precision=_str_list(
                data.get("kept_in_higher_precision", []), f"{where}.kept_in_higher_precision"
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "unet": self.unet,
            "decoder": self.decoder,
            "text_encoder": list(self.text_encoder),
            "parity": dict(self.parity),
            "kept_in_higher_precision": list(self.kept_in_higher_precision),
        }


@dataclass(frozen=True)
class FileEntry:
    """sha256 (64 lowercase hex digits) and size in bytes of one bundle file."""

    sha256: str
    size: int

    @classmethod
    def from_dict(cls, raw: object, where: str) -> FileEntry:
        data = _check_keys(raw, where, ("sha256", "size"))
        digest = data["sha256"]
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise ManifestError(
                f"bundle.json: {where}.sha256 must be 64 lowercase hex digits, got {digest!r}"
            )
        return cls(sha256=digest, size=_int(data["size"], f"{where}.size"))


@dataclass(frozen=True)
class Provenance:
    """Where the bundle came from: the checkpoint hash, tool versions, creation time (ISO 8601)."""

    source_checkpoint_sha256: str | None = None
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @classmethod
    def from_dict(cls, raw: object) -> Provenance:
        data = _check_keys(raw, "provenance", (), ("source_checkpoint_sha256", "tools", "created"))
        checkpoint = data.get("source_checkpoint_sha256")
        if checkpoint is not None:
            checkpoint = _str(checkpoint, "provenance.source_checkpoint_sha256")
        tools = _dict(data.get("tools", {}), "provenance.tools")
        for key, value in tools.items():
            _str(value, f"provenance.tools.{key}")
        created = data.get("created", "")
        if not isinstance(created, str):
            raise ManifestError(f"bundle.json: provenance.created must be a string, got {created!r}")
        return cls(source_checkpoint_sha256=checkpoint, tools=tools, created=created)


@dataclass(frozen=True)
class BundleManifest:
    """The parsed ``bundle.json``. Build one with ``files={}`` and let ``write_manifest`` fill them."""

    name: str
    model: ModelSpec
    defaults: Defaults
    variants: dict[str, Variant]
    license: str
    provenance: Provenance = field(default_factory=Provenance)
    files: dict[str, FileEntry] = field(default_factory=dict)
    model_card: str | None = None
    format_version: int = FORMAT_VERSION

    # -- queries -----------------------------------------------------------------------------

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this manifest describes, in PRECISIONS order."""
        return tuple(p for p in PRECISIONS if p in self.variants)

    @property
    def tokenizer_files(self) -> tuple[str, ...]:
        return tuple(spec.tokenizer for spec in self.model.text_encoders)

    def variant(self, precision: str) -> Variant:
        """The file names of one precision, or ManifestError naming the precisions present."""
        if precision not in self.variants:
            raise ManifestError(
                f"model {self.name!r} has no {precision!r} variant; available: {list(self.precisions)}",
                hint="pick one of the available precisions",
            )
        return self.variants[precision]

    def variant_files(self, precision: str) -> tuple[str, ...]:
        """Every file needed to run ``precision``: ONNX files with their external-data companions
        (``unet.fp32.onnx.data``, ...), tokenizers and the model card."""
        model_files = self._with_companions(self.variant(precision).model_files)
        extra = (self.model_card,) if self.model_card else ()
        return tuple(dict.fromkeys((*model_files, *self.tokenizer_files, *extra)))

    def _with_companions(self, model_files: Iterable[str]) -> tuple[str, ...]:
        """``model_files`` plus listed files named ``<model file>.*``/``<model file>_*`` (ONNX external data)."""
        names = list(model_files)
        for name in list(names):
            names.extend(f for f in self.files if f != name and f.startswith((f"{name}.", f"{name}_")))
        return tuple(dict.fromkeys(names))

    def files_for(self, precisions: Iterable[str] | None = None) -> tuple[str, ...]:
        """Files of ``self.files`` expected on disk when only ``precisions`` are installed.

        A file used only by variants outside ``precisions`` is not expected; every other listed file
        (tokenizers, model card, license, ...) is. ``None`` means every variant.
        """
        if precisions is None:
            return tuple(sorted(self.files))
        wanted = set(precisions)
        other_only: set[str] = set()
        for precision, variant in self.variants.items():
            if precision not in wanted:
                other_only.update(self._with_companions(variant.model_files))
        for precision in wanted:
            other_only.difference_update(self._with_companions(self.variant(precision).model_files))
        return tuple(sorted(name for name in self.files if name not in other_only))

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    # -- JSON --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: object) -> BundleManifest:
        """Parse a migrated ``bundle.json`` dict strictly; raises ManifestError naming the field."""
        required = ("format_version", "name", "model", "defaults", "variants", "files", "license")
        data = _check_keys(raw, "bundle.json", required, ("provenance", "model_card"))
        version = data["format_version"]
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"bundle.json: format_version {version!r} is not {FORMAT_VERSION} after migration"
            )
        variants_raw = _dict(data["variants"], "variants")
        if not variants_raw:
            raise ManifestError("bundle.json: variants is empty; a bundle needs at least one precision")
        unknown = sorted(set(variants_raw) - set(PRECISIONS))
        if unknown:
            raise ManifestError(
                f"bundle.json: unknown precision(s) {unknown} in variants; allowed: {list(PRECISIONS)}"
            )
        files_raw = _dict(data["files"], "files")
        model_card = data.get("model_card")
        manifest = cls(
            format_version=FORMAT_VERSION,
            name=_str(data["name"], "name"),
            model=ModelSpec.from_dict(data["model"]),
            defaults=Defaults.from_dict(data["defaults"]),
            variants={p: Variant.from_dict(v, f"variants.{p}") for p, v in variants_raw.items()},
            files={
                check_relative_path(name, "files"): FileEntry.from_dict(entry, f"files[{name!r}]")
                for name, entry in sorted(files_raw.items())
            },
            provenance=Provenance.from_dict(data.get("provenance", {})),
            license=_str(data["license"], "license"),
            model_card=None if model_card is None else check_relative_path(_str(model_card, "model_card")),
        )
        manifest.check_references()
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to ``bundle.json`` (keys sorted when dumped)."""
        data: dict[str, Any] = {
            "format_version": self.format_version,
            "name": self.name,
            "model": {
                "unet": dict(self.model.unet),
                "decoder": dict(self.model.decoder),
                "text_encoders": [dataclasses.asdict(spec) for spec in self.model.text_encoders],
                "latent_channels": self.model.latent_channels,
                "vae_scale_factor": self.model.vae_scale_factor,
                "null_condition": self.model.null_condition,
            },
            "defaults": dataclasses.asdict(self.defaults),
            "variants": {p: v.to_dict() for p, v in self.variants.items()},
            "files": {name: dataclasses.asdict(entry) for name, entry in sorted(self.files.items())},
            "provenance": dataclasses.asdict(self.provenance),
            "license": self.license,
        }
        if self.model_card is not None:
            data["model_card"] = self.model_card
        return data

    def referenced_files(self) -> tuple[str, ...]:
        """Every file name the manifest points at (all variants, tokenizers, model card)."""
        names: list[str] = [spec.file for spec in self.model.text_encoders]
        for precision in self.precisions:
            names.extend(self.variant_files(precision))
        return tuple(dict.fromkeys(names))

    def check_references(self) -> None:
        """Raise ManifestError when a variant, tokenizer or model card names a file not in ``files``."""
        absent = [name for name in self.referenced_files() if name not in self.files]
        if absent:
            raise ManifestError(
                f"bundle.json: {absent} are named by the manifest but not listed in files",
                hint="re-export the bundle so that bundle.json lists every file",
            )
        if MANIFEST_NAME in self.files:
            raise ManifestError("bundle.json: files must not list bundle.json itself")


def migrate_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring a raw ``bundle.json`` dict up to FORMAT_VERSION. Every migration lives here.

    There is only version 1 so far; a future version 2 adds ``if version == 1: ...; version = 2``.
    A version newer than this code understands is an error that says to upgrade.
    """
    if not isinstance(raw, dict):
        raise ManifestError(f"bundle.json must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(
            f"bundle.json: format_version must be a positive integer, got {version!r}",
            hint="this does not look like a SnapGen bundle; re-export it with `snapgen export`",
        )
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"bundle.json: format_version {version} is newer than this SnapGen Studio understands ({FORMAT_VERSION})",
            hint="upgrade snapgen-studio",
        )
    return dict(raw)


def read_manifest(bundle_dir: str | os.PathLike[str]) -> BundleManifest:
    """Read, migrate and strictly parse ``<bundle_dir>/bundle.json``."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"{path} does not exist",
            hint="a runtime bundle needs bundle.json; export one with `snapgen export`",
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{path} is not valid JSON: {exc}", hint="re-download or re-export the bundle"
        ) from exc
    return BundleManifest.from_dict(migrate_manifest(raw))


# ----------------------------------------------------------------------------------------------
# hashing, writing, verifying


def hash_file(
    path: str | os.PathLike[str],
    *,
    on_bytes: Callable[[int], None] | None = None,
    cancel: CancelCheck | None = None,
    chunk_size: int = HASH_CHUNK_BYTES,
) -> str:
    """Streaming sha256 of a file as 64 lowercase hex digits; ``on_bytes(n)`` after each chunk of n bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            if cancel is not None and cancel():
                raise StoreCancelled(f"hashing {path} was cancelled")
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Every regular file under ``root`` as sorted relative POSIX paths (following no symlinked dirs)."""
    base = Path(root)
    found: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(base):
        for filename in filenames:
            found.append((Path(dirpath) / filename).relative_to(base).as_posix())
    return sorted(found)


def find_pickles(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths of every pickle-extension file under ``root``."""
    return [name for name in list_files(root) if is_pickle_name(name)]


def refuse_pickles(root: str | os.PathLike[str], names: Iterable[str] | None = None) -> None:
    """Raise UnsafeFileError naming every pickle file (in ``names`` or found under ``root``)."""
    pickles = sorted(n for n in names if is_pickle_name(n)) if names is not None else find_pickles(root)
    if pickles:
        raise UnsafeFileError(
            f"pickle files are refused (they can run code when loaded): {pickles} in {root}",
            hint="convert them to .safetensors or ONNX and remove the pickle files",
            files=tuple(pickles),
        )


def write_manifest(
    bundle_dir: str | os.PathLike[str],
    manifest: BundleManifest,
    *,
    progress: VerifyProgress | None = None,
    cancel: CancelCheck | None = None,
) -> BundleManifest:
    """Hash every file of ``bundle_dir`` (except bundle.json), store them in ``files`` and write
    ``bundle.json`` atomically (temp file + os.replace). Returns the manifest as written.

    Refuses pickle files, files named by the manifest but absent, and malformed ONNX/safetensors.
    """
    root = Path(bundle_dir)
    names = [n for n in list_files(root) if n != MANIFEST_NAME and not _is_manifest_temp(n)]
    refuse_pickles(root, names)
    for name in names:
        check_model_file(root / name)
    total = sum((root / n).stat().st_size for n in names)
    done = 0
    files: dict[str, FileEntry] = {}
    for name in names:
        path = root / name

        def _advance(n: int, _name: str = name) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total, _name)

        files[name] = FileEntry(
            sha256=hash_file(path, on_bytes=_advance, cancel=cancel), size=path.stat().st_size
        )
    written = dataclasses.replace(manifest, files=files, format_version=FORMAT_VERSION)
    # round-trip through the strict parser so that we never write what we would refuse to read
    BundleManifest.from_dict(written.to_dict())
    _atomic_write_json(root / MANIFEST_NAME, written.to_dict())
    return written


def _is_manifest_temp(name: str) -> bool:
    return name.startswith(".bundle.json.") and name.endswith(".tmp")


def _atomic_write_json(path: Path, payload: object) -> None:
    """Write JSON to a temp file in the same folder, fsync it, then os.replace it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FileCheck:
    """Result of checking one file. Sizes in bytes; sha256 as hex; None where not applicable."""

    path: str
    status: FileStatus
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    expected_size: int | None = None
    actual_size: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """One human line, e.g. ``unet.int8.onnx: mismatch (size 10 != expected 12)``."""
        if self.status == "mismatch":
            if self.actual_size != self.expected_size:
                return f"{self.path}: mismatch (size {self.actual_size} != expected {self.expected_size})"
            return f"{self.path}: mismatch (sha256 {self.actual_sha256} != expected {self.expected_sha256})"
        return f"{self.path}: {self.status}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    precisions: Iterable[str] | None = None,
    progress: VerifyProgress | None = None,
    cancel: CancelCheck | None = None,
    manifest: BundleManifest | None = None,
) -> list[FileCheck]:
    """Re-hash the files of a bundle against its manifest.

    Returns one FileCheck per expected file (``ok``/``missing``/``mismatch``, see
    ``BundleManifest.files_for(precisions)``) followed by one per file on disk that the manifest does
    not list (``unexpected``). A size difference is reported without hashing.
    """
    root = Path(bundle_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    expected = manifest.files_for(precisions)
    present = {n for n in list_files(root) if n != MANIFEST_NAME and not _is_manifest_temp(n)}
    total = sum(manifest.files[n].size for n in expected if n in present)
    done = 0
    checks: list[FileCheck] = []
    for name in expected:
        entry = manifest.files[name]
        if name not in present:
            checks.append(FileCheck(name, "missing", entry.sha256, None, entry.size, None))
            continue
        size = (root / name).stat().st_size
        if size != entry.size:
            checks.append(FileCheck(name, "mismatch", entry.sha256, None, entry.size, size))
            done += entry.size
            if progress is not None:
                progress(done, total, name)
            continue

        def _advance(n: int, _name: str = name) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total, _name)

        digest = hash_file(root / name, on_bytes=_advance, cancel=cancel)
        status: FileStatus = "ok" if digest == entry.sha256 else "mismatch"
        checks.append(FileCheck(name, status, entry.sha256, digest, entry.size, size))
    for name in sorted(present - set(manifest.files)):
        checks.append(FileCheck(name, "unexpected", None, None, None, (root / name).stat().st_size))
    return checks


def verify_or_raise(
    bundle_dir: str | os.PathLike[str],
    *,
    precisions: Iterable[str] | None = None,
    progress: VerifyProgress | None = None,
    cancel: CancelCheck | None = None,
) -> BundleManifest:
    """Verify a bundle and return its manifest, or raise.

    Raises UnsafeFileError when any pickle file is present, IntegrityError when an expected file is
    missing or altered. Unexpected non-pickle files (a README, an OS thumbnail cache) are tolerated.
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    refuse_pickles(root)
    checks = verify_bundle(root, precisions=precisions, progress=progress, cancel=cancel, manifest=manifest)
    bad = [c for c in checks if c.status in ("missing", "mismatch")]
    if bad:
        shown = "; ".join(c.describe() for c in bad[:4]) + (
            f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
        )
        raise IntegrityError(
            f"bundle {root} failed verification: {shown}",
            hint="re-download or re-import the model; `snapgen models verify NAME` lists every file",
            files=tuple(c.path for c in bad),
        )
    return manifest


def installed_precisions(bundle_dir: str | os.PathLike[str], manifest: BundleManifest) -> tuple[str, ...]:
    """Precisions whose every file is present with the listed size (no hashing; cheap)."""
    root = Path(bundle_dir)
    found = []
    for precision in manifest.precisions:
        names = manifest.variant_files(precision)
        if all(_has_size(root / n, manifest.files[n].size) for n in names):
            found.append(precision)
    return tuple(found)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# file-format sanity checks (no safetensors/onnx import)


def check_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a .safetensors file's header and return it (a dict of tensor name -> info).

    Format: 8-byte little-endian unsigned header length N, then N bytes of JSON, then the data.
    Raises IntegrityError when the file is shorter than 8 + N bytes, the JSON does not parse, or a
    tensor's ``data_offsets`` reach past the end of the file (a truncated download or copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes; a safetensors file starts with an 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len == 0 or 8 + header_len > size:
            raise _corrupt(path, f"header says {header_len} bytes but the file has {size} bytes")
        if header_len > 100 * 1024 * 1024:
            raise _corrupt(path, f"header length {header_len} bytes is implausible")
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _corrupt(path, f"tensor {name!r} has no valid data_offsets")
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise _corrupt(
                path, f"tensor {name!r} ends at byte {offsets[1]} of {data_size} data bytes (truncated)"
            )
    return header


def check_onnx_file(path: str | os.PathLike[str]) -> int:
    """Check that a file plausibly is a serialized ONNX ModelProto and return its ir_version.

    There is no magic number in ONNX (it is a bare protobuf message). Every ONNX writer we know (the
    onnx C++/Python serializer used by torch.onnx and onnxruntime tools) writes fields in field-number
    order, and ONNX Runtime refuses a model without ``ir_version`` (field 1, varint), so a valid file
    starts with tag byte 0x08 followed by a small varint. This catches empty files, HTML error pages,
    git-LFS pointer files and pickles saved as .onnx; a damaged graph is caught later by ONNX Runtime.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise _corrupt(path, "the file is empty")
    if head[0] != 0x08:
        raise _corrupt(path, f"does not start like an ONNX model (first byte 0x{head[0]:02x}, expected 0x08)")
    ir_version, shift = 0, 0
    for byte in head[1:11]:
        ir_version |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise _corrupt(path, "ir_version varint is malformed")
    if not 1 <= ir_version <= 100:
        raise _corrupt(path, f"ir_version {ir_version} is implausible for an ONNX model")
    return ir_version


def check_model_file(path: str | os.PathLike[str], *, name: str | None = None) -> None:
    """Refuse pickles and run the header check that matches the extension (.safetensors, .onnx).

    ``name`` is the file's real name when ``path`` is a temporary one (a download's ``.part`` file).
    """
    path = Path(path)
    name = name if name is not None else path.name
    if is_pickle_name(name):
        refuse_pickles(path.parent, [name])
    suffix = Path(name).suffix.lower()
    if suffix == ".safetensors":
        check_safetensors_header(path)
    elif suffix == ".onnx":
        check_onnx_file(path)


def check_model_files(root: str | os.PathLike[str], names: Iterable[str] | None = None) -> None:
    """Refuse pickles under ``root`` (all named at once), then check every ONNX/safetensors header."""
    names = list(names) if names is not None else list_files(root)
    refuse_pickles(root, names)
    for name in names:
        check_model_file(Path(root) / name)


def _corrupt(path: Path, reason: str) -> IntegrityError:
    return IntegrityError(
        f"{path}: {reason}",
        hint="the file is truncated or not what its name says; download or copy it again",
        files=(path.name,),
    )


def manifest_from_json(text: str) -> BundleManifest:
    """Parse ``bundle.json`` text (e.g. fetched from the Hub before the files)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"bundle.json is not valid JSON: {exc}") from exc
    return BundleManifest.from_dict(migrate_manifest(raw))


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PICKLE_SUFFIXES",
    "PRECISIONS",
    "BundleManifest",
    "Defaults",
    "FileCheck",
    "FileEntry",
    "ModelSpec",
    "Provenance",
    "TextEncoderSpec",
    "Variant",
    "check_model_file",
    "check_model_files",
    "check_onnx_file",
    "check_relative_path",
    "check_safetensors_header",
    "find_pickles",
    "hash_file",
    "installed_precisions",
    "is_pickle_name",
    "list_files",
    "manifest_from_json",
    "migrate_manifest",
    "read_manifest",
    "refuse_pickles",
    "verify_bundle",
    "verify_or_raise",
    "write_manifest",
]

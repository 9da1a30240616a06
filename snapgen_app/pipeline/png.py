"""PNG files with the full generation settings inside, written atomically.

Text chunks of every image:
- one per field: ``prompt``, ``seed``, ``steps``, ``size`` ("WxH"), ``model``, ``bundle_hash``,
  ``precision``, ``provider``, ``version``, plus ``Software``;
- ``parameters``: the AUTOMATIC1111 layout that other tools (InvokeAI, ComfyUI, civitai) read:
  ``"<prompt>\\nSteps: 4, Sampler: Euler flow, CFG scale: 1.0, Seed: 1, Size: 128x128, Model hash: ..., Model: ..."``;
- ``snapgen``: JSON with the resolved request (``request``, without output paths) and this image's
  seed/index, from which :func:`read_png_metadata` rebuilds a GenerationRequest that reproduces
  exactly this image.

Files are written as temp file + fsync + rename in the target folder, so a crash or a full disk
never leaves a half-written PNG under the final name.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from snapgen_app import __version__
from snapgen_app.api import GenerationRequest
from snapgen_app.errors import SnapGenError, UsageError

SNAPGEN_CHUNK = "snapgen"
PARAMETERS_CHUNK = "parameters"
METADATA_FORMAT_VERSION = 1
SAMPLER_NAME = "Euler flow"


@dataclass(frozen=True)
class ImageProvenance:
    """What produced one image, beyond the request: its own seed and index in the batch, the
    bundle and runtime that ran it."""

    seed: int
    index: int
    model_name: str
    bundle_hash: str
    precision: str
    provider: str
    version: str = __version__


def png_text_chunks(request: GenerationRequest, image: ImageProvenance) -> dict[str, str]:
    """The text chunks for one image of ``request`` (which must be resolved: steps, size, shift
    and guidance set). Insertion order is the chunk order in the file."""
    steps, width, height = (
        _resolved(request, "steps"),
        _resolved(request, "width"),
        _resolved(request, "height"),
    )
    # Where the file was written is not a generation setting: keeping it out keeps the bytes
    # independent of the output folder and keeps the user's folder names out of shared images.
    request = request.replace(output_dir=None, output_paths=())
    payload = {
        "format_version": METADATA_FORMAT_VERSION,
        "request": request.to_dict(),
        "image": {"seed": image.seed, "index": image.index},
        "model_name": image.model_name,
        "bundle_hash": image.bundle_hash,
        "precision": image.precision,
        "provider": image.provider,
        "version": image.version,
    }
    return {
        "prompt": request.prompt,
        "seed": str(image.seed),
        "steps": str(steps),
        "size": f"{width}x{height}",
        "model": image.model_name,
        "bundle_hash": image.bundle_hash,
        "precision": image.precision,
        "provider": image.provider,
        "version": image.version,
        "Software": f"SnapGen Studio {image.version}",
        PARAMETERS_CHUNK: a1111_parameters(request, image),
        SNAPGEN_CHUNK: json.dumps(payload, sort_keys=True, separators=(",", ":")),
    }


def a1111_parameters(request: GenerationRequest, image: ImageProvenance) -> str:
    """AUTOMATIC1111-style ``parameters`` text: the prompt, then one line of "Key: value" pairs."""
    fields = [
        ("Steps", _resolved(request, "steps")),
        ("Sampler", SAMPLER_NAME),
        ("CFG scale", _resolved(request, "guidance_scale")),
        ("Seed", image.seed),
        ("Size", f"{_resolved(request, 'width')}x{_resolved(request, 'height')}"),
        ("Model hash", image.bundle_hash[:10]),
        ("Model", image.model_name),
        ("Shift", _resolved(request, "shift")),
        ("Precision", image.precision),
        ("Provider", image.provider),
        ("Version", f"snapgen-studio {image.version}"),
    ]
    # A1111 quotes values containing commas or colons so the line stays parseable.
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields)
    return f"{request.prompt}\n{line}"


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def _resolved(request: GenerationRequest, name: str) -> Any:
    value = getattr(request, name)
    if value is None:
        raise ValueError(f"request.{name} must be resolved before writing PNG metadata")
    return value


def encode_png(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """PNG bytes of uint8 [H, W, 3] ``pixels`` with ``text`` chunks (deterministic for equal inputs)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # tEXt for Latin-1, iTXt (UTF-8) otherwise
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_files_atomically(files: Sequence[tuple[Path, bytes]], *, keep_existing: bool = False) -> list[Path]:
    """Write every (path, data) to a temp file beside it, fsync, then rename them all into place;
    returns the paths written.

    Nothing appears under a final name until every file has been written in full; on any error
    the temp files are removed and the error names the path (SnapGenError). With ``keep_existing``
    (names the application chose) a name that exists by then, e.g. written by another generation
    running at the same time, is never replaced: the file takes the next free ``NAME-N.png``.
    """
    temps: list[tuple[str, Path]] = []
    mode = _file_mode()
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            # mkstemp creates 0600; a picture gets the permissions any new file would (umask).
            if hasattr(os, "fchmod"):  # not on Windows, where the default is already readable
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        written = [_claim(tmp, path) if keep_existing else _replace(tmp, path) for tmp, path in temps]
    except BaseException as exc:  # also Ctrl-C: never leave temp files behind
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not isinstance(exc, OSError):
            raise
        raise SnapGenError(
            f"cannot write {exc.filename or 'the image'}: {exc.strerror or exc}",
            hint="check that the folder exists, is writable and the disk has space",
        ) from exc
    return written


def _replace(tmp: str, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def _claim(tmp: str, path: Path) -> Path:
    """Give ``tmp`` the name ``path``, or ``path``'s next free ``-N`` variant, never replacing a file:
    a hard link fails when the name exists (one system call, so no other process can slip between)."""
    for counter in itertools.count():
        candidate = path if counter == 0 else path.with_name(f"{path.stem}-{counter}{path.suffix}")
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: check, then rename (a small window)
            if candidate.exists():
                continue
            os.replace(tmp, candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    raise AssertionError("unreachable")


def _file_mode() -> int:
    """0o666 minus the process umask (read without changing it for other threads: via /proc when
    available, else by setting and restoring it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_png(path: str | Path, pixels: np.ndarray, text: dict[str, str]) -> Path:
    """Write one PNG atomically; returns its path."""
    target = Path(path)
    write_files_atomically([(target, encode_png(pixels, text))])
    return target


def read_png_text(path: str | Path) -> dict[str, str]:
    """Every tEXt/iTXt/zTXt chunk of a PNG as a dict. Raises UsageError when it is not a PNG."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise UsageError(f"{path} is a {image.format} file, not a PNG")
            image.load()
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    except (OSError, SyntaxError) as exc:
        raise UsageError(f"cannot read {path} as a PNG: {exc}") from exc


def read_png_metadata(path: str | Path) -> GenerationRequest:
    """The GenerationRequest that reproduces this image: the stored request with this image's
    seed, ``num_images=1`` and no output paths.

    Reads our ``snapgen`` chunk; for images from other tools falls back to the AUTOMATIC1111
    ``parameters`` chunk (prompt, steps, seed, size, CFG scale, shift). Raises UsageError when the
    PNG holds neither.
    """
    text = read_png_text(path)
    if SNAPGEN_CHUNK in text:
        try:
            payload = json.loads(text[SNAPGEN_CHUNK])
            raw = dict(payload["request"])
            seed = int(payload["image"]["seed"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: the snapgen metadata chunk is damaged ({exc})") from exc
        raw.update(seed=seed, num_images=1, output_paths=[], output_dir=None)
        return GenerationRequest.from_dict(raw)
    if PARAMETERS_CHUNK in text:
        return parse_a1111_parameters(text[PARAMETERS_CHUNK])
    raise UsageError(f"{path} holds no generation settings (no 'snapgen' or 'parameters' text chunk)")


def parse_a1111_parameters(text: str) -> GenerationRequest:
    """A GenerationRequest from an AUTOMATIC1111 ``parameters`` text (unknown keys are ignored,
    since other tools add their own)."""
    prompt, _, settings = text.rpartition("\n")
    if not prompt:
        prompt, settings = text, ""
    values = _split_settings(settings)
    changes: dict[str, Any] = {}
    try:  # another tool's values ("Steps: 20.0", "Size: auto") are a bad chunk, not a crash
        if "Steps" in values:
            changes["steps"] = int(values["Steps"])
        if "Seed" in values:
            changes["seed"] = int(values["Seed"])
        if "Size" in values and "x" in values["Size"]:
            width, height = values["Size"].split("x", 1)
            changes.update(width=int(width), height=int(height))
        if "CFG scale" in values:
            changes["guidance_scale"] = float(values["CFG scale"])
        if "Shift" in values:
            changes["shift"] = float(values["Shift"])
        if "Model" in values:
            changes["model"] = values["Model"]
        return GenerationRequest(prompt=prompt.strip(), **changes)
    except ValueError as exc:
        raise UsageError(f"the 'parameters' chunk has a bad value: {exc}") from exc


def _split_settings(line: str) -> dict[str, str]:
    """Parse ``Key: value, Key: "quoted, value"`` into a dict."""
    values: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            decoder = json.JSONDecoder()
            try:
                value, end = decoder.raw_decode(line, j)
            except json.JSONDecodeError:
                value, end = line[j:], n
            values[key] = str(value)
            comma = line.find(",", end)
        else:
            comma = line.find(",", j)
            values[key] = line[j : comma if comma >= 0 else n].strip()
        if comma < 0:
            break
        i = comma + 1
    return values

"""Data: image folders with captions, center crop or aspect buckets, latent and text caches.

A dataset folder holds images with same-name caption files (``cat.png`` + ``cat.txt``) or a
``metadata.jsonl`` (``{"file_name": "cat.png", "text": "a cat"}`` per line, the diffusers /
datasets image-folder convention; it wins when present). Missing captions fall back to the file
name ("red_circle.png" -> "red circle") and are counted. Unreadable images are skipped and counted,
never fatal; a folder with nothing usable is a clear error.

Caches (under ``cache_dir``): ``latents-NNNNN.safetensors`` shards with one latent per image
(``{index}`` -> [C, h, w] float32) and ``text-NNNNN.safetensors`` with the frozen text encoders'
outputs per caption, plus ``index.json`` (fingerprint, items, skip report). A cache whose fingerprint
matches (same files relative to their folder, sizes, mtimes, resolution, bucketing, encoder weights) is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from snapgen_app.errors import TrainingError
from snapgen_app.finetune import IMAGE_EXTENSIONS, METADATA_FILE, read_caption, read_metadata_captions
from snapgen_app.images import UNREADABLE, checked_size, rgb_image


@dataclasses.dataclass(frozen=True)
class Item:
    """One training picture: its file, caption and where the caption came from."""

    path: str
    caption: str
    caption_source: str  # "txt", "metadata" or "filename"


@dataclasses.dataclass
class ScanReport:
    """What a folder scan found (reported to the user before training)."""

    items: list[Item]
    captions_from_filename: int = 0
    ignored_files: int = 0
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (and the first few skipped files with their reason)."""
        return {
            "images": len(self.items),
            "captions_from_filename": self.captions_from_filename,
            "ignored_files": self.ignored_files,
            "skipped_images": len(self.skipped),
            "skipped_examples": self.skipped[:5],
        }


def caption_from_filename(path: Path) -> str:
    """'red_circle-03.png' -> 'red circle 03'."""
    return " ".join(path.stem.replace("_", " ").replace("-", " ").split())


def scan_folder(folder: str | Path, caption_extension: str = ".txt") -> ScanReport:
    """List the images of ``folder`` (recursively) with their captions. Raises on an unusable folder."""
    root = Path(folder)
    if not root.is_dir():
        raise TrainingError(f"data folder {root} does not exist or is not a folder", hint="set data.path")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise TrainingError(
            f"data folder {root} is empty", hint="put images (png, jpg, webp) with .txt captions there"
        )
    metadata = read_metadata_captions(root) if (root / METADATA_FILE).exists() else None
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise TrainingError(
            f"data folder {root} has {len(files)} files but no images",
            hint=f"allowed image extensions: {', '.join(IMAGE_EXTENSIONS)}",
        )
    report = ScanReport(items=[])
    used_captions = set()
    for image in images:
        rel = image.relative_to(root).as_posix()
        txt = image.with_suffix(caption_extension)
        if metadata is not None and rel in metadata:
            report.items.append(Item(str(image), metadata[rel], "metadata"))
        elif txt.exists():
            report.items.append(Item(str(image), read_caption(txt), "txt"))
            used_captions.add(txt)
        else:
            report.items.append(Item(str(image), caption_from_filename(image), "filename"))
            report.captions_from_filename += 1
    report.ignored_files = len(files) - len(images) - len(used_captions) - (1 if metadata is not None else 0)
    return report


# --- image preprocessing ------------------------------------------------------------------------


def aspect_buckets(resolution: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of ``step``, with about resolution**2 pixels each."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_aspect:
        height = int(area // width) // step * step
        if height >= step and max(height / width, width / height) <= max_aspect:
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's."""
    aspect = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - aspect))


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """Image file -> [3, H, W] float32 in [-1, 1]: upright and flattened onto white
    (:func:`~snapgen_app.images.rgb_image`), resized to cover ``size`` (H, W), center-cropped."""
    with Image.open(path) as img:
        img = rgb_image(img)
        target_h, target_w = size
        scale = max(target_h / img.height, target_w / img.width)
        resized = img.resize(
            (max(target_w, round(img.width * scale)), max(target_h, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left = (resized.width - target_w) // 2
        top = (resized.height - target_h) // 2
        cropped = resized.crop((left, top, left + target_w, top + target_h))
        array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_size(path: str) -> tuple[int, int]:
    """(height, width) as shown (EXIF orientation applied) without decoding the pixels; raises on
    an unreadable file."""
    width, height = checked_size(path)
    return height, width


# --- caches -------------------------------------------------------------------------------------


def fingerprint(items: list[Item], extra: dict[str, Any]) -> str:
    """Hash of the item list (paths, sizes, mtimes, captions) and the settings that shape the cache.

    Paths count relative to the folder the images share, so a run folder that was moved or
    hard-linked (same files, sizes, mtimes) keeps its cache instead of re-encoding every image.
    """
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    base = os.path.commonpath([os.path.dirname(os.path.abspath(i.path)) for i in items]) if items else ""
    for item in items:
        stat = Path(item.path).stat()
        rel = Path(os.path.relpath(os.path.abspath(item.path), base)).as_posix()
        digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}|{item.caption}\n".encode())
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's weight bytes (names, dtypes, shapes, values).

    Hashes the bytes, not float sums: a reduction's result depends on the thread count, which made
    a cache built with 2 threads look stale to a run with 1.
    """
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
"""Images [B,3,H,W] in [-1,1] float32 -> diffusion-space latents [B,C,H/f,W/f] float32."""

TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
"""Captions -> frozen text features {name: [B, ...]} (what the trainable projections consume)."""


@dataclasses.dataclass
class LatentCache:
    """Everything training reads: latents, the caption index per item, text features per caption."""

    latents: list[torch.Tensor]
    caption_ids: list[int]
    text: dict[str, torch.Tensor]  # name -> [num_captions, ...]
    captions: list[str]
    report: dict[str, Any]

    def __len__(self) -> int:
        return len(self.latents)


def _encode_images(
    items: list[Item], sizes: list[tuple[int, int]], encode: ImageEncoder, batch: int
) -> tuple[list[tuple[int, torch.Tensor]], list[dict[str, str]]]:
    """Encode readable images grouped by size; returns (item index, latent) pairs and skips."""
    out: list[tuple[int, torch.Tensor]] = []
    skipped: list[dict[str, str]] = []
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    for size, indices in sorted(by_size.items()):
        for start in range(0, len(indices), batch):
            chunk, pixels = [], []
            for i in indices[start : start + batch]:
                try:
                    pixels.append(load_image(items[i].path, size))
                    chunk.append(i)
                except UNREADABLE as exc:
                    skipped.append({"file": items[i].path, "reason": f"{type(exc).__name__}: {exc}"[:200]})
            if chunk:
                with torch.no_grad():
                    latents = encode(torch.stack(pixels)).float()
                out += list(zip(chunk, latents, strict=True))
    return out, skipped


def build_cache(
    report: ScanReport,
    cache_dir: Path,
    *,
    resolution: int,
    buckets: bool,
    bucket_step: int,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    encoder_id: str,
    shard_size: int = 256,
    batch: int = 16,
) -> LatentCache:
    """Encode every readable image once (and every caption once) into safetensors shards.

    Reuses an existing cache with the same fingerprint. Raises when no image could be read.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "resolution": resolution,
        "buckets": buckets,
        "bucket_step": bucket_step,
        "encoder": encoder_id,
    }
    key = fingerprint(report.items, settings)
    index_path = cache_dir / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("fingerprint") == key:
            return _load_cache(cache_dir, index)

    sizes: list[tuple[int, int]] = []
    skipped: list[dict[str, str]] = list(report.skipped)
    bucket_list = aspect_buckets(resolution, bucket_step) if buckets else []
    readable: list[Item] = []
    for item in report.items:
        try:
            h, w = image_size(item.path)
        except UNREADABLE as exc:
            skipped.append({"file": item.path, "reason": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        readable.append(item)
        sizes.append(nearest_bucket(h, w, bucket_list) if buckets else (resolution, resolution))
    encoded, more_skipped = _encode_images(readable, sizes, encode_images, batch)
    skipped += more_skipped
    if not encoded:
        raise TrainingError(
            f"none of the {len(report.items)} images could be read (first: {skipped[0]['reason'] if skipped else '?'})",
            hint="check that the files are real PNG/JPEG/WebP pictures",
        )
    encoded.sort(key=lambda pair: pair[0])
    captions = sorted({readable[i].caption for i, _ in encoded})
    caption_index = {c: n for n, c in enumerate(captions)}
    entries = []
    for n, (i, _latent) in enumerate(encoded):
        entries.append(
            {
                "file": readable[i].path,
                "caption": caption_index[readable[i].caption],
                "shard": n // shard_size,
            }
        )
    for shard in range(0, len(encoded), shard_size):
        save_file(
            {
                str(n): latent.contiguous()
                for n, (_, latent) in enumerate(encoded[shard : shard + shard_size], start=shard)
            },
            str(cache_dir / f"latents-{shard // shard_size:05d}.safetensors"),
        )
    text_features: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(captions), 64):
        with torch.no_grad():
            for name, value in encode_text(captions[start : start + 64]).items():
                text_features.setdefault(name, []).append(value.detach().float().cpu())
    save_file(
        {name: torch.cat(parts).contiguous() for name, parts in text_features.items()},
        str(cache_dir / "text-00000.safetensors"),
    )
    summary = report.summary() | {
        "images": len(encoded),
        "skipped_images": len(skipped),
        "skipped_examples": skipped[:5],
    }
    index = {"fingerprint": key, "entries": entries, "captions": captions, "report": summary}
    (cache_dir / ".index.json.tmp").write_text(json.dumps(index))
    (cache_dir / ".index.json.tmp").replace(index_path)
    return _load_cache(cache_dir, index)


def _load_cache(cache_dir: Path, index: dict[str, Any]) -> LatentCache:
    latents: list[torch.Tensor] = []
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for n, entry in enumerate(index["entries"]):
        shard = entry["shard"]
        if shard not in shards:
            shards[shard] = load_file(str(cache_dir / f"latents-{shard:05d}.safetensors"))
        latents.append(shards[shard][str(n)])
    text = load_file(str(cache_dir / "text-00000.safetensors"))
    return LatentCache(
        latents=latents,
        caption_ids=[e["caption"] for e in index["entries"]],
        text=text,
        captions=list(index["captions"]),
        report=dict(index["report"]),
    )


# --- deterministic, resumable batching ----------------------------------------------------------


def epoch_batches(cache: LatentCache, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """All batches of one epoch: items grouped by latent size, shuffled by (seed, epoch).

    Batches never mix sizes (aspect buckets); a bucket's last partial batch is dropped unless the
    bucket has fewer items than ``batch_size`` (then it is one smaller batch: tiny folders still train).
    """
    rng = random.Random(seed * 100_003 + epoch)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, latent in enumerate(cache.latents):
        groups.setdefault(tuple(latent.shape), []).append(i)
    batches: list[list[int]] = []
    for _, indices in sorted(groups.items()):
        rng.shuffle(indices)
        if len(indices) < batch_size:
            batches.append(indices)
            continue
        batches += [indices[s : s + batch_size] for s in range(0, len(indices) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


@dataclasses.dataclass
class DataPosition:
    """Where the batch stream stands: epoch and index of the next batch inside it (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0


def batch_stream(
    cache: LatentCache, batch_size: int, seed: int, position: DataPosition, rank: int = 0, world: int = 1
) -> Iterator[list[int]]:
    """Endless batches for one process from ``position`` on (advances ``position`` in place).

    Every rank sees the same global batch order and takes ``batches[rank::world]``; ``position.batch``
    counts global steps inside the epoch so all ranks stay in step and resume together.
    """
    while True:
        batches = epoch_batches(cache, batch_size, seed, position.epoch)
        per_step = len(batches) // world
        if per_step == 0:
            raise TrainingError(
                f"{len(batches)} batches per epoch cannot feed {world} processes",
                hint="use a smaller batch_size or fewer processes",
            )
        while position.batch < per_step:
            index = position.batch * world + rank
            position.batch += 1
            yield batches[index]
        position.epoch += 1
        position.batch = 0


def collate(cache: LatentCache, indices: list[int]) -> dict[str, torch.Tensor]:
    """Stack latents [B,C,h,w] and the cached text features of their captions {name: [B,...]}."""
    caption_ids = torch.tensor([cache.caption_ids[i] for i in indices])
    out = {"latents": torch.stack([cache.latents[i] for i in indices])}
    for name, table in cache.text.items():
        out[f"text.{name}"] = table[caption_ids]
    return out

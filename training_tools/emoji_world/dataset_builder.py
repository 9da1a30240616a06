"""Writes an emoji-world dataset: PNGs + metadata.jsonl (diffusers image-folder layout) + classes.json.

``python -m training_tools.emoji_world build --out DIR --seed S --num-images N [--num-classes 200]
[--mix single=0.6,count=0.1,two=0.07,position=0.16,row=0.07] [--workers 2]``

Each metadata.jsonl line: {"file_name", "text", "kind", "background", "relation", "objects":
[{"class_index", "name", "bbox"}]}. Image i is drawn from np.random.default_rng([seed, i, SALT]) so the
output does not depend on the number of workers, and the classifier (another salt) never sees
these exact renders.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snapgen_app.config import ConfigBase, require
from snapgen_app.errors import ConfigError

from .compose import KINDS, CaptionOptions, SceneSpec, make_scene, sample_request
from .curation import EmojiClass, curate, load_classes, save_classes
from .render import font_sha256

GENERATOR_SALT = 1  # rng stream of the generator's training images; the classifier uses others
# Single-object images teach object identity: in pilots (docs/training.md, "What limits the built-in
# model") a student reached 40 % single-object accuracy after 83k samples of single-emoji images,
# while the students of the 45 %-single mix reached 12.5 % after 88k. Compositions keep the rest.
DEFAULT_MIX = {"single": 0.6, "count": 0.1, "two": 0.07, "position": 0.16, "row": 0.07}
METADATA = "metadata.jsonl"
CLASSES = "classes.json"
BUILD = "build.json"


@dataclasses.dataclass(frozen=True)
class BuildConfig(ConfigBase):
    """Dataset build settings (saved as build.json next to the images)."""

    num_images: int = 2000
    seed: int = 0
    num_classes: int = 200
    class_seed: int = 0
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))
    p_background: float = 0.75
    p_alias: float = 0.2
    p_one: float = 0.1
    bg_jitter: int = 6

    def validate(self) -> None:
        require(self.num_images >= 1, "num_images", "must be >= 1")
        unknown = set(self.mix) - set(KINDS)
        require(not unknown, "mix", f"unknown kinds {sorted(unknown)}", allowed=KINDS)
        require(all(v >= 0 for v in self.mix.values()), "mix", "weights must be >= 0")
        require(sum(self.mix.values()) > 0, "mix", "at least one weight must be > 0")
        for name in ("p_background", "p_alias", "p_one"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "must be within [0, 1]")


def parse_mix(text: str) -> dict[str, float]:
    """'single=0.4,row=0.1' -> {'single': 0.4, 'row': 0.1}; kinds left out get weight 0."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        if not sep:
            raise ConfigError("mix", f"{part!r} is not KIND=WEIGHT", allowed=KINDS)
        try:
            mix[kind.strip()] = float(value)
        except ValueError:
            raise ConfigError("mix", f"{value!r} is not a number") from None
    return mix


def image_rng(seed: int, index: int, salt: int = GENERATOR_SALT) -> np.random.Generator:
    """The random stream of image ``index`` of a build with ``seed`` (independent of workers)."""
    return np.random.default_rng([seed, index, salt])


def draw_example(
    index: int, config: BuildConfig, classes: Sequence[EmojiClass], salt: int = GENERATOR_SALT
) -> tuple[np.ndarray, SceneSpec]:
    """Image ``index`` of the build: (image [128, 128, 3] uint8, spec). Deterministic."""
    rng = image_rng(config.seed, index, salt)
    kinds = sorted(config.mix)
    weights = np.asarray([config.mix[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    request = sample_request(kind, classes, rng)
    options = CaptionOptions(p_background=config.p_background, p_alias=config.p_alias, p_one=config.p_one)
    return make_scene(request, classes, rng, options, bg_jitter=config.bg_jitter)


def metadata_record(file_name: str, spec: SceneSpec) -> dict[str, Any]:
    """One metadata.jsonl line: file_name + text (the image-folder convention) + the scene spec."""
    spec_dict = spec.to_dict()
    text = spec_dict.pop("text")
    return {"file_name": file_name, "text": text, **spec_dict}


def read_metadata(directory: str | Path) -> list[tuple[str, SceneSpec]]:
    """(file_name, spec) per line of DIR/metadata.jsonl; unknown keys raise ConfigError."""
    records = []
    path = Path(directory) / METADATA
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        raw = json.loads(line)
        file_name = raw.pop("file_name", None)
        if not isinstance(file_name, str):
            raise ConfigError(f"{path}:{line_no}.file_name", "missing or not a string")
        raw["text"] = raw.pop("text", None)
        records.append((file_name, SceneSpec.from_dict(raw)))
    return records


# Worker state: set once per process so the class list is not pickled with every task.
_WORKER: dict[str, Any] = {}


def _init_worker(config: BuildConfig, classes: list[EmojiClass], out: str) -> None:
    _WORKER.update(config=config, classes=classes, out=out)


def _write_chunk(indices: range) -> list[str]:
    config, classes, out = _WORKER["config"], _WORKER["classes"], Path(_WORKER["out"])
    lines = []
    for index in indices:
        image, spec = draw_example(index, config, classes)
        file_name = f"{index:08d}.png"
        Image.fromarray(image).save(out / file_name, compress_level=1)
        lines.append(json.dumps(metadata_record(file_name, spec), ensure_ascii=False))
    return lines


def _chunks(total: int, size: int) -> Iterator[range]:
    for start in range(0, total, size):
        yield range(start, min(total, start + size))


def build(
    out: str | Path, config: BuildConfig, *, workers: int = 1, classes: list[EmojiClass] | None = None
) -> dict[str, Any]:
    """Write config.num_images images + metadata.jsonl + classes.json + build.json into ``out``.

    Returns a summary {num_images, seconds, images_per_second, kinds}. The class list is curated with
    (num_classes, class_seed) unless given.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / METADATA).exists():
        raise ConfigError(str(out), "already holds a dataset (metadata.jsonl)", hint="pick an empty --out")
    started = time.perf_counter()
    classes = classes if classes is not None else curate(config.num_classes, config.class_seed)
    save_classes(classes, out / CLASSES, seed=config.class_seed)
    chunks = list(_chunks(config.num_images, 250))
    if workers > 1:
        # Not fork: a fork of a process with threads (torch's, a test runner's) can copy a held lock
        # and hang the worker (seen once in CI under load). Each worker renders its own sprites.
        with multiprocessing.get_context("forkserver").Pool(
            workers, _init_worker, (config, classes, str(out))
        ) as pool:
            parts = pool.map(_write_chunk, chunks)
    else:
        _init_worker(config, classes, str(out))
        parts = [_write_chunk(c) for c in chunks]
    lines = [line for part in parts for line in part]
    (out / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    kinds: dict[str, int] = {}
    for line in lines:
        kind = json.loads(line)["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = {
        "num_images": len(lines),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(lines) / seconds, 1),
        "kinds": kinds,
    }
    build_info = {"config": config.to_dict(), "font_sha256": font_sha256(), "summary": summary}
    (out / BUILD).write_text(json.dumps(build_info, indent=2) + "\n")
    return summary


def load_classes_of(directory: str | Path) -> list[EmojiClass]:
    """The class list saved with a dataset."""
    return load_classes(Path(directory) / CLASSES)

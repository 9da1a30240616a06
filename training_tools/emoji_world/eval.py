"""EmojiEval: a GenEval for the emoji world.

A fixed, seeded prompt set with five categories, each prompt carrying its structured expectation:

- ``single_object``  "a maple leaf"                     -> some found object is classified as it
- ``two_object``     "a dog and a rocket"               -> both classes among the found objects
- ``counting``       "three apples" (1-4)               -> exactly that many objects classified as it
- ``background``     "a dog on a blue background"       -> the border is uniform and nearest to blue
- ``position``       "a dog to the left of a rocket"    -> both found and their box centres agree

Objects are found by :mod:`finder` (border background + connected components) and each crop is
classified by the :mod:`classifier`. Scores are per-category accuracies and their mean (overall).
A Frechet distance between the classifier's penultimate features of the generated images and of
real renders of the same prompts (whole images resized to the classifier's input) comes with it.

``python -m training_tools.emoji_world.eval --images DIR --classifier CLS [--prompts P] [--json]``
scores DIR/00000.png ... against the prompt set (DIR/prompts.json by default, else the default set
for the classifier's classes). ``prompts`` and ``render`` subcommands write a prompt set and real,
noise or blank images for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from snapgen_app.config import ConfigBase, require
from snapgen_app.errors import ConfigError, SnapGenError

from .classifier import CROP_MARGIN, EmojiClassifier, load_classifier, predict
from .compose import RELATIONS, SceneRequest, allowed_backgrounds, caption_for, make_scene, relation_holds
from .curation import EmojiClass
from .finder import DEFAULT_FINDER, FinderConfig, estimate_background, find_objects
from .render import IMAGE_SIZE, PALETTE, Box, square_crop

CATEGORIES = ("single_object", "two_object", "counting", "background", "position")
EVAL_SALT = 4  # prompt sampling; real references use REFERENCE_SALT
REFERENCE_SALT = 5
DEFAULT_EVAL_SEED = 2025
DEFAULT_PER_CATEGORY = 80
PROMPTS_FILE = "prompts.json"

GenerateFn = Callable[[list[str], list[int]], Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PromptSpec(ConfigBase):
    """One eval prompt and what a correct image shows.

    classes: expected class indices (one, or two for two_object/position); count: exact number for
    counting (0 = at least one); background: checked only in the background category;
    relation: classes[0] stands ``relation`` to classes[1]; seed: the generation seed.
    """

    category: str
    text: str
    seed: int
    classes: tuple[int, ...]
    count: int = 0
    background: str | None = None
    relation: str | None = None

    def validate(self) -> None:
        require(self.category in CATEGORIES, "PromptSpec.category", f"{self.category!r}", allowed=CATEGORIES)
        require(
            self.background in (None, *PALETTE),
            "PromptSpec.background",
            "unknown colour",
            allowed=list(PALETTE),
        )
        require(
            self.relation in (None, *RELATIONS), "PromptSpec.relation", "unknown relation", allowed=RELATIONS
        )


# --- the prompt set --------------------------------------------------------------------------


def _request_for(prompt: PromptSpec, background: str) -> SceneRequest:
    if prompt.category == "counting":
        return SceneRequest("count", prompt.classes * prompt.count, background)
    if prompt.category == "two_object":
        return SceneRequest("two", prompt.classes, background)
    if prompt.category == "position":
        return SceneRequest("position", prompt.classes, background, prompt.relation)
    return SceneRequest("single", prompt.classes, background)


def make_prompts(
    classes: Sequence[EmojiClass], per_category: int = DEFAULT_PER_CATEGORY, seed: int = DEFAULT_EVAL_SEED
) -> list[PromptSpec]:
    """The fixed prompt set: ``per_category`` prompts per category, canonical captions, seeded.

    Single-object prompts cycle through the classes in a seeded order so each class is asked for;
    counting cycles through 1..4; position cycles through the four relations.
    """
    rng = np.random.default_rng([seed, EVAL_SALT])
    order = rng.permutation(len(classes))
    prompts: list[PromptSpec] = []
    for category in CATEGORIES:
        for k in range(per_category):
            prompts.append(_one_prompt(category, k, classes, order, rng, seed_base=len(prompts)))
    return prompts


def _one_prompt(
    category: str,
    k: int,
    classes: Sequence[EmojiClass],
    order: np.ndarray,
    rng: np.random.Generator,
    seed_base: int,
) -> PromptSpec:
    seed = 10_000 + seed_base
    while True:
        if category in ("single_object", "background", "counting"):
            picked = (
                int(order[k % len(order)])
                if category == "single_object"
                else int(rng.integers(len(classes))),
            )
        else:
            picked = tuple(int(i) for i in rng.choice(len(classes), size=2, replace=False))
        backgrounds = allowed_backgrounds(classes, picked)
        if backgrounds:
            break
    count = k % 4 + 1 if category == "counting" else 0
    relation = RELATIONS[k % 4] if category == "position" else None
    background = backgrounds[int(rng.integers(len(backgrounds)))] if category == "background" else None
    request = _request_for(
        PromptSpec(category, "", seed, picked, count, None, relation), background or "white"
    )
    text = caption_for(request, classes, rng, mention_background=category == "background")
    return PromptSpec(category, text, seed, picked, count, background, relation)


def save_prompts(prompts: Sequence[PromptSpec], path: str | Path) -> None:
    """Write the prompt set as JSON {format_version, prompts: [...]}."""
    payload = {"format_version": 1, "prompts": [p.to_dict() for p in prompts]}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Read a prompt set written by :func:`save_prompts`."""
    raw = json.loads(Path(path).read_text())
    if set(raw) != {"format_version", "prompts"} or raw["format_version"] != 1:
        raise ConfigError(
            str(path), "not a prompt set of format_version 1", hint="write one with `eval prompts`"
        )
    return [PromptSpec.from_dict(p) for p in raw["prompts"]]


# --- reference images ------------------------------------------------------------------------


def render_real(
    prompts: Sequence[PromptSpec], classes: Sequence[EmojiClass], seed: int = 0
) -> list[np.ndarray]:
    """Real renders satisfying each prompt (the builder's scenes): list of [128, 128, 3] uint8.

    The background, when the prompt leaves it open, is drawn from the colours its objects show on.
    """
    images = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, i, REFERENCE_SALT])
        if prompt.background is not None:
            background = prompt.background
        else:
            options = allowed_backgrounds(classes, prompt.classes)
            background = options[int(rng.integers(len(options)))]
        image, _ = make_scene(_request_for(prompt, background), classes, rng, text=prompt.text)
        images.append(image)
    return images


def render_noise(count: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform random RGB images [128, 128, 3] uint8 (a sanity floor)."""
    rng = np.random.default_rng([seed, 7])
    return [rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(count)]


def render_blank(count: int, color: tuple[int, int, int] = (80, 250, 250)) -> list[np.ndarray]:
    """Single-colour images [128, 128, 3] uint8 (a sanity floor). The default cyan is the colour
    farthest from every palette colour, so no background prompt counts it as right."""
    return [np.full((IMAGE_SIZE, IMAGE_SIZE, 3), color, dtype=np.uint8) for _ in range(count)]


# --- scoring ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageReading:
    """What the finder and classifier saw in one image: background name (None if not uniform) and
    the found boxes with their top-1 class."""

    background: str | None
    boxes: tuple[Box, ...]
    labels: tuple[int, ...]


def read_images(
    images: Sequence[np.ndarray], model: EmojiClassifier, finder: FinderConfig = DEFAULT_FINDER
) -> list[ImageReading]:
    """Find and classify the objects of every image ([H, W, 3] uint8, resized to 128 if needed)."""
    size = model.config.input_size
    backgrounds, all_boxes, crops = [], [], []
    for image in images:
        image = _as_rgb128(image)
        background = estimate_background(image, finder)
        boxes = find_objects(image, background, finder)
        backgrounds.append(background.color)
        all_boxes.append(boxes)
        crops.extend(square_crop(image, box, size, CROP_MARGIN) for box in boxes)
    stacked = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    labels = predict(model, stacked)[0].tolist()
    readings, start = [], 0
    for background, boxes in zip(backgrounds, all_boxes, strict=True):
        readings.append(ImageReading(background, tuple(boxes), tuple(labels[start : start + len(boxes)])))
        start += len(boxes)
    return readings


def _largest_box_of(reading: ImageReading, class_index: int) -> Box | None:
    """The first (largest) found box classified as ``class_index``, or None."""
    for box, label in zip(reading.boxes, reading.labels, strict=True):
        if label == class_index:
            return box
    return None


def is_correct(prompt: PromptSpec, reading: ImageReading) -> bool:
    """Whether an image's reading satisfies its prompt (the rules in the module docstring)."""
    if prompt.category == "background":
        return reading.background == prompt.background
    if prompt.category == "counting":
        return reading.labels.count(prompt.classes[0]) == prompt.count
    if prompt.category == "position":
        a, b = (_largest_box_of(reading, c) for c in prompt.classes)
        return a is not None and b is not None and relation_holds(a, b, str(prompt.relation))
    return all(c in reading.labels for c in prompt.classes)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features [N, F] and [M, F] (float64 math).

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), with symmetric square
    roots from eigendecompositions (stable for rank-deficient covariances, unlike sqrtm of S_a S_b).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def image_features(images: Sequence[np.ndarray], model: EmojiClassifier) -> np.ndarray:
    """Penultimate classifier features of whole images resized to its input: [N, F] float32."""
    size = model.config.input_size
    small = np.stack(
        [
            np.asarray(Image.fromarray(_as_rgb128(im)).resize((size, size), Image.Resampling.BILINEAR))
            for im in images
        ]
    )
    return predict(model, small)[2]


def _as_rgb128(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError("images", f"expected HxWx3 uint8 arrays, got {array.dtype} {array.shape}")
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        array = np.asarray(Image.fromarray(array).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    return array


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Per-category accuracy (0..1), overall = mean over the categories present, per-prompt
    correctness and readings, and the Frechet distance to real renders (None when not computed)."""

    per_category: dict[str, float]
    overall: float
    num_images: int
    frechet_distance: float | None
    correct: tuple[bool, ...]
    readings: tuple[ImageReading, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (per-prompt results left out: see :meth:`prompt_results`)."""
        return {
            "per_category": self.per_category,
            "overall": self.overall,
            "num_images": self.num_images,
            "frechet_distance": self.frechet_distance,
        }

    def prompt_results(
        self, prompts: Sequence[PromptSpec], classes: Sequence[EmojiClass]
    ) -> list[dict[str, Any]]:
        """One dict per prompt: what was asked, whether it passed, and what the finder and the
        classifier saw (background name or None when not uniform; objects largest first), so a
        miss can be looked at next to its image (``image``: the file name in an images folder)."""
        if len(prompts) != len(self.readings):
            raise ConfigError("prompts", f"{len(prompts)} prompts for {len(self.readings)} readings")
        return [
            {
                "image": image_name(i),
                "text": prompt.text,
                "category": prompt.category,
                "correct": ok,
                "seen_background": reading.background,
                "seen_objects": [classes[label].name for label in reading.labels],
            }
            for i, (prompt, ok, reading) in enumerate(zip(prompts, self.correct, self.readings, strict=True))
        ]

    def format(self) -> str:
        """Human-readable table."""
        lines = [f"{name:<14} {100 * acc:6.1f} %" for name, acc in self.per_category.items()]
        lines.append(f"{'overall':<14} {100 * self.overall:6.1f} %   ({self.num_images} images)")
        if self.frechet_distance is not None:
            lines.append(f"{'frechet':<14} {self.frechet_distance:8.3f}")
        return "\n".join(lines)


def score(
    images: Sequence[np.ndarray],
    prompts: Sequence[PromptSpec],
    model: EmojiClassifier,
    *,
    reference: Sequence[np.ndarray] | None = None,
    finder: FinderConfig = DEFAULT_FINDER,
) -> EvalReport:
    """Score images (list of [H, W, 3] uint8, one per prompt) against their prompts.

    reference: real renders for the Frechet distance (None skips it). Raises ConfigError when the
    numbers of images and prompts differ.
    """
    if len(images) != len(prompts):
        raise ConfigError("images", f"{len(images)} images for {len(prompts)} prompts; need one per prompt")
    readings = read_images(images, model, finder)
    correct = tuple(is_correct(p, r) for p, r in zip(prompts, readings, strict=True))
    per_category = {}
    for category in CATEGORIES:
        hits = [c for c, p in zip(correct, prompts, strict=True) if p.category == category]
        if hits:
            per_category[category] = float(np.mean(hits))
    overall = float(np.mean(list(per_category.values()))) if per_category else 0.0
    distance = None
    if reference is not None and len(images) >= 2 and len(reference) >= 2:
        distance = frechet_distance(image_features(images, model), image_features(reference, model))
    return EvalReport(per_category, overall, len(images), distance, correct, tuple(readings))


def evaluate(
    generate_fn: GenerateFn,
    classifier_dir: str | Path,
    *,
    prompts: Sequence[PromptSpec] | None = None,
    per_category: int = DEFAULT_PER_CATEGORY,
    batch_size: int = 50,
    with_frechet: bool = True,
) -> EvalReport:
    """Generate the prompt set with ``generate_fn(texts, seeds) -> list of [H, W, 3] uint8`` in batches
    and score it. The prompt set defaults to :func:`make_prompts` over the classifier's classes."""
    model, classes = load_classifier(classifier_dir)
    prompts = list(prompts) if prompts is not None else make_prompts(classes, per_category)
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        out = generate_fn([p.text for p in batch], [p.seed for p in batch])
        if len(out) != len(batch):
            raise SnapGenError(f"generate_fn returned {len(out)} images for {len(batch)} prompts")
        images.extend(np.asarray(im) for im in out)
    reference = render_real(prompts, classes) if with_frechet else None
    return score(images, prompts, model, reference=reference)


# --- files and command line -----------------------------------------------------------------


def image_name(index: int) -> str:
    """File name of the image for prompt ``index`` in an eval images directory."""
    return f"{index:05d}.png"


def write_images(directory: str | Path, images: Sequence[np.ndarray], prompts: Sequence[PromptSpec]) -> None:
    """Save images as DIR/00000.png ... next to DIR/prompts.json."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image)).save(out / image_name(i))
    save_prompts(prompts, out / PROMPTS_FILE)


def read_images_dir(directory: str | Path, count: int) -> list[np.ndarray]:
    """Load DIR/00000.png ... for ``count`` prompts as RGB uint8 arrays."""
    out = []
    for i in range(count):
        path = Path(directory) / image_name(i)
        if not path.is_file():
            raise ConfigError(
                str(path), "missing", hint=f"the directory needs one image per prompt ({count})"
            )
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training_tools.emoji_world.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score DIR/00000.png ... (the default command)")
    s.add_argument("--images", required=True)
    s.add_argument("--classifier", required=True, help="directory written by the classifier's train")
    s.add_argument("--prompts", help="prompt set (default DIR/prompts.json, else the default set)")
    s.add_argument("--no-frechet", action="store_true", help="skip the Frechet distance")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--per-prompt", metavar="FILE", help="also write every prompt's result and what was seen (JSON)"
    )
    s.add_argument("--threads", type=int, default=1, help="torch threads for the classifier")
    p = sub.add_parser("prompts", help="write the default prompt set for the classifier's classes")
    p.add_argument("--classifier", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-category", type=int, default=DEFAULT_PER_CATEGORY)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    r = sub.add_parser("render", help="write real/noise/blank images for a prompt set (sanity checks)")
    r.add_argument("--classifier", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--kind", choices=("real", "noise", "blank"), default="real")
    r.add_argument("--prompts", help="prompt set (default: the default set)")
    r.add_argument("--per-category", type=int, default=DEFAULT_PER_CATEGORY)
    return parser


def _prompts_for(
    path: str | None, images_dir: str | None, classes: Sequence[EmojiClass], per: int
) -> list[PromptSpec]:
    if path:
        return load_prompts(path)
    if images_dir and (Path(images_dir) / PROMPTS_FILE).is_file():
        return load_prompts(Path(images_dir) / PROMPTS_FILE)
    return make_prompts(classes, per)


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``--images`` without a subcommand means ``score``. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "score")
    args = _parser().parse_args(argv)
    try:
        model, classes = load_classifier(args.classifier)
        if args.command == "prompts":
            save_prompts(make_prompts(classes, args.per_category, args.seed), args.out)
            print(f"wrote {args.out}")
            return 0
        if args.command == "render":
            prompts = _prompts_for(args.prompts, None, classes, args.per_category)
            makers = {
                "real": lambda: render_real(prompts, classes, seed=1),
                "noise": lambda: render_noise(len(prompts)),
                "blank": lambda: render_blank(len(prompts)),
            }
            write_images(args.out, makers[args.kind](), prompts)
            print(f"wrote {len(prompts)} {args.kind} images to {args.out}")
            return 0
        torch.set_num_threads(args.threads)
        prompts = _prompts_for(args.prompts, args.images, classes, DEFAULT_PER_CATEGORY)
        images = read_images_dir(args.images, len(prompts))
        reference = None if args.no_frechet else render_real(prompts, classes)
        report = score(images, prompts, model, reference=reference)
        if args.per_prompt:
            results = {"prompts": report.prompt_results(prompts, classes)}
            Path(args.per_prompt).write_text(json.dumps(results, indent=1) + "\n")
    except SnapGenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

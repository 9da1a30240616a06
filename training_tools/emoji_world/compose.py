"""Scenes of the emoji world: 1-4 emoji on a background colour, their layout, render and caption.

A :class:`SceneRequest` says what to draw (kind, classes, background, relation); :func:`render_scene`
lays it out (sizes, positions, small rotations) and returns the image with the real box of every
object; :func:`caption_for` writes its text. Together they make a :class:`SceneSpec`, the structured
record stored per image in metadata.jsonl and checked by the eval.

Kinds: ``single`` (one emoji), ``count`` (2-4 copies of one emoji), ``two`` (two emoji anywhere),
``position`` (two emoji, object 0 ``left_of``/``right_of``/``above``/``below`` object 1),
``row`` (three emoji left to right).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from snapgen_app.config import ConfigBase, require

from .curation import EmojiClass
from .render import (
    IMAGE_SIZE,
    PALETTE,
    Box,
    glyph_sprite,
    jitter_color,
    paste,
    solid_background,
    transform_sprite,
)

KINDS = ("single", "count", "two", "position", "row")
RELATIONS = ("left_of", "right_of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MIN_GAP = 6  # px between objects so the eval's object finder sees separate components
_RELATION_TEXT = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
# Longer side in px per kind and object count: small enough to fit, large enough to recognise.
_SIZE_RANGES = {
    "single": (56, 104),
    "count": (30, 50),
    "two": (38, 60),
    "position": (38, 60),
    "row": (30, 40),
}
_MAX_ANGLE = 12.0


@dataclasses.dataclass(frozen=True)
class ObjectSpec(ConfigBase):
    """One drawn emoji: its class index (into the class list), name and box [x0, y0, x1, y1)."""

    class_index: int
    name: str
    bbox: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class SceneSpec(ConfigBase):
    """What one image shows; the structured record of metadata.jsonl next to file_name and text.

    relation: for ``position`` how object 0 stands to object 1; ``row`` for a row; else None.
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None
    text: str

    def validate(self) -> None:
        require(self.kind in KINDS, "SceneSpec.kind", f"{self.kind!r} is unknown", allowed=KINDS)
        require(self.background in PALETTE, "SceneSpec.background", "unknown colour", allowed=list(PALETTE))
        require(
            self.relation in (None, "row", *RELATIONS), "SceneSpec.relation", f"{self.relation!r} is unknown"
        )


@dataclasses.dataclass(frozen=True)
class SceneRequest:
    """What to draw, without geometry: class indices in drawing order (a count repeats one index)."""

    kind: str
    class_indices: tuple[int, ...]
    background: str
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """Caption randomness: how often the background is named, an alias replaces the name, and a
    single emoji is called "one X" (the counting prompts ask for one too)."""

    p_background: float = 0.75
    p_alias: float = 0.2
    p_one: float = 0.1


CANONICAL = CaptionOptions(p_background=0.0, p_alias=0.0, p_one=0.0)


# --- words -----------------------------------------------------------------------------------

_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "child": "children",
}
_SAME_PLURAL = {"sheep", "fish", "deer", "bison", "shrimp", "squid", "sushi", "moose", "oden", "sake", "dna"}
_SPLIT_WORDS = (" with ", " of ", " in ", " on ", " behind ", " and ", " for ")


def article(phrase: str) -> str:
    """'a' or 'an' for ``phrase`` by its first sound ('an apple', 'a unicorn', 'a one-piece')."""
    word = phrase.lower()
    if word.startswith(("uni", "use", "eu", "one", "ufo")):
        return "a"
    return "an" if word[:1] in "aeiou" or word.startswith(("hour", "honest")) else "a"


def _plural_word(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _SAME_PLURAL:
        return word
    if word.endswith(("ss", "us", "is", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("s"):
        return word  # already plural: 'beans', 'skis'
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    return word + "s"


def plural(phrase: str) -> str:
    """Plural of a noun phrase by its head noun: 'red apple' -> 'red apples',
    'cup with straw' -> 'cups with straw', 'cut of meat' -> 'cuts of meat'."""
    cut = min((phrase.find(w) for w in _SPLIT_WORDS if w in phrase), default=len(phrase))
    head, tail = phrase[:cut], phrase[cut:]
    words = head.split(" ")
    words[-1] = _plural_word(words[-1])
    return " ".join(words) + tail


def with_article(phrase: str) -> str:
    """'apple' -> 'an apple'."""
    return f"{article(phrase)} {phrase}"


# --- captions --------------------------------------------------------------------------------


def _pick_name(cls: EmojiClass, rng: np.random.Generator, options: CaptionOptions) -> str:
    if cls.aliases and rng.random() < options.p_alias:
        return str(cls.aliases[int(rng.integers(len(cls.aliases)))])
    return cls.name


def caption_for(
    request: SceneRequest,
    classes: Sequence[EmojiClass],
    rng: np.random.Generator,
    options: CaptionOptions = CANONICAL,
    *,
    mention_background: bool | None = None,
) -> str:
    """Caption of a scene, e.g. 'two apples on a yellow background', 'a dog to the left of a rocket'.

    mention_background: force naming the background (True/False); None draws it with p_background.
    """
    names = [_pick_name(classes[i], rng, options) for i in request.class_indices]
    kind = request.kind
    if kind == "single":
        text = f"one {names[0]}" if rng.random() < options.p_one else with_article(names[0])
    elif kind == "count":
        n = len(request.class_indices)
        text = f"one {names[0]}" if n == 1 else f"{NUMBER_WORDS[n]} {plural(names[0])}"
    elif kind == "two":
        text = f"{with_article(names[0])} and {with_article(names[1])}"
    elif kind == "position":
        assert request.relation is not None
        text = f"{with_article(names[0])} {_RELATION_TEXT[request.relation]} {with_article(names[1])}"
    elif kind == "row":
        text = f"{with_article(names[0])}, {with_article(names[1])} and {with_article(names[2])} in a row"
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    mention = rng.random() < options.p_background if mention_background is None else mention_background
    return f"{text} on {with_article(request.background)} background" if mention else text


# --- layout ----------------------------------------------------------------------------------


def _gap_ok(a: Box, b: Box, gap: int = MIN_GAP) -> bool:
    """True when boxes a and b are at least ``gap`` px apart along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def box_center(box: Box) -> tuple[float, float]:
    """(cx, cy) of a box."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def relation_holds(a: Box, b: Box, relation: str) -> bool:
    """Whether box ``a`` stands ``relation`` to box ``b`` by centres: the offset along the named
    axis has the right sign and is at least as large as the offset along the other axis."""
    (ax, ay), (bx, by) = box_center(a), box_center(b)
    dx, dy = bx - ax, by - ay
    if relation == "left_of":
        return dx > 0 and dx >= abs(dy)
    if relation == "right_of":
        return dx < 0 and -dx >= abs(dy)
    if relation == "above":
        return dy > 0 and dy >= abs(dx)
    if relation == "below":
        return dy < 0 and -dy >= abs(dx)
    raise ValueError(f"unknown relation {relation!r}; allowed: {RELATIONS}")


def _free_layout(sizes: list[tuple[int, int]], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners for sprites of ``sizes`` (w, h) anywhere, not overlapping (rejection sampling,
    falling back to a 2x2 grid of cells)."""
    for _ in range(200):
        corners = [
            (int(rng.integers(0, IMAGE_SIZE - w + 1)), int(rng.integers(0, IMAGE_SIZE - h + 1)))
            for w, h in sizes
        ]
        boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes, strict=True)]
        if all(_gap_ok(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            return corners
    cells = [int(c) for c in rng.permutation(4)[: len(sizes)]]
    half = IMAGE_SIZE // 2
    corners = []
    for cell, (w, h) in zip(cells, sizes, strict=True):
        cx, cy = (cell % 2) * half, (cell // 2) * half
        corners.append(
            (cx + int(rng.integers(0, max(1, half - w - 2))), cy + int(rng.integers(0, max(1, half - h - 2))))
        )
    return corners


def _line_layout(sizes: list[tuple[int, int]], rng: np.random.Generator, axis: int) -> list[tuple[int, int]]:
    """Corners placing sprites in order along ``axis`` (0: left to right, 1: top to bottom), with
    random gaps >= MIN_GAP + 2 and a common centre line jittered by a few px across the axis."""
    lengths = [s[axis] for s in sizes]
    slack = IMAGE_SIZE - sum(lengths) - (MIN_GAP + 2) * (len(sizes) - 1)
    slack = max(slack, 0)
    cuts = np.sort(rng.integers(0, slack + 1, size=len(sizes)))  # split the slack: lead + gaps
    position = int(cuts[0])
    across = [s[1 - axis] for s in sizes]
    centre = int(rng.integers(max(across) // 2, IMAGE_SIZE - max(across) // 2 + 1))
    corners = []
    for i, (length, width) in enumerate(zip(lengths, across, strict=True)):
        offset = int(np.clip(centre - width // 2 + rng.integers(-4, 5), 0, IMAGE_SIZE - width))
        corners.append((position, offset) if axis == 0 else (offset, position))
        extra = int(cuts[i + 1] - cuts[i]) if i + 1 < len(cuts) else 0
        position += length + MIN_GAP + 2 + extra
    return corners


def _line_axis(request: SceneRequest) -> int | None:
    """0 for scenes laid out left to right, 1 for top to bottom, None for free placement."""
    if request.kind == "row" or request.relation in ("left_of", "right_of"):
        return 0
    if request.relation in ("above", "below"):
        return 1
    return None


def _sprites(
    request: SceneRequest, classes: Sequence[EmojiClass], rng: np.random.Generator
) -> list[Image.Image]:
    """Scaled and rotated sprites; for line layouts shrunk until they fit the canvas with their gaps."""
    n = len(request.class_indices)
    low, high = _SIZE_RANGES[request.kind]
    if request.kind == "count" and n <= 2:
        low, high = low + 8, high + 10  # fewer copies leave room for larger ones
    targets = [int(rng.integers(low, high + 1)) for _ in request.class_indices]
    angles = [float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE)) for _ in request.class_indices]
    axis = _line_axis(request)
    scale = 1.0
    while True:
        sprites = []
        for index, target, angle in zip(request.class_indices, targets, angles, strict=True):
            sprite = glyph_sprite(classes[index].char)
            if sprite is None:
                raise ValueError(f"class {classes[index].name!r} does not render with this font")
            sprites.append(transform_sprite(sprite, max(12, round(target * scale)), angle))
        if axis is None or sum(s.size[axis] for s in sprites) + (MIN_GAP + 2) * (n - 1) <= IMAGE_SIZE:
            return sprites
        scale *= 0.9


def _corners(
    request: SceneRequest, sizes: list[tuple[int, int]], rng: np.random.Generator
) -> list[tuple[int, int]]:
    axis = _line_axis(request)
    if axis is None:
        return _free_layout(sizes, rng)
    if request.relation in ("right_of", "below"):  # object 0 goes second along the axis
        return _line_layout(sizes[::-1], rng, axis)[::-1]
    return _line_layout(sizes, rng, axis)


def render_scene(
    request: SceneRequest,
    classes: Sequence[EmojiClass],
    rng: np.random.Generator,
    *,
    bg_jitter: int = 6,
    postprocess: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None,
) -> tuple[np.ndarray, list[Box]]:
    """Draw a scene. Returns (image [128, 128, 3] uint8, one box (x0, y0, x1, y1) per object).

    postprocess: optional image -> image hook (the classifier's augmentations).
    """
    sprites = _sprites(request, classes, rng)
    sizes = [s.size for s in sprites]
    corners = _corners(request, sizes, rng)
    canvas = solid_background(jitter_color(PALETTE[request.background], rng, bg_jitter))
    boxes = [paste(canvas, s, x, y) for s, (x, y) in zip(sprites, corners, strict=True)]
    if postprocess is not None:
        canvas = postprocess(canvas, rng)
    return np.asarray(canvas), boxes


# --- sampling requests -----------------------------------------------------------------------


def allowed_backgrounds(classes: Sequence[EmojiClass], indices: Sequence[int]) -> list[str]:
    """Palette colours on which every listed class stays visible (palette order)."""
    allowed = set(PALETTE)
    for i in indices:
        allowed &= set(classes[i].backgrounds)
    return [name for name in PALETTE if name in allowed]


def sample_request(kind: str, classes: Sequence[EmojiClass], rng: np.random.Generator) -> SceneRequest:
    """A random scene of ``kind`` over ``classes`` with a background all its objects show on."""
    require(kind in KINDS, "kind", f"{kind!r} is unknown", allowed=KINDS)
    for _ in range(100):
        if kind in ("single", "count"):
            n = 1 if kind == "single" else int(rng.integers(2, 5))
            indices = (int(rng.integers(len(classes))),) * n
        else:
            n = 3 if kind == "row" else 2
            indices = tuple(int(i) for i in rng.choice(len(classes), size=n, replace=False))
        backgrounds = allowed_backgrounds(classes, indices)
        if backgrounds:
            background = backgrounds[int(rng.integers(len(backgrounds)))]
            relation = (
                RELATIONS[int(rng.integers(4))] if kind == "position" else ("row" if kind == "row" else None)
            )
            return SceneRequest(kind, indices, background, relation)
    raise ValueError("no background fits the drawn classes after 100 tries; check the class list")


def make_scene(
    request: SceneRequest,
    classes: Sequence[EmojiClass],
    rng: np.random.Generator,
    options: CaptionOptions = CANONICAL,
    *,
    mention_background: bool | None = None,
    text: str | None = None,
    bg_jitter: int = 6,
    postprocess: Callable[[Image.Image, np.random.Generator], Image.Image] | None = None,
) -> tuple[np.ndarray, SceneSpec]:
    """Render ``request`` and caption it (or use ``text``). Returns (image [128,128,3] uint8, spec)."""
    image, boxes = render_scene(request, classes, rng, bg_jitter=bg_jitter, postprocess=postprocess)
    if text is None:
        text = caption_for(request, classes, rng, options, mention_background=mention_background)
    objects = tuple(
        ObjectSpec(class_index=i, name=classes[i].name, bbox=box)
        for i, box in zip(request.class_indices, boxes, strict=True)
    )
    return image, SceneSpec(
        kind=request.kind,
        objects=objects,
        background=request.background,
        relation=request.relation,
        text=text,
    )

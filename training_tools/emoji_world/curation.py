"""Choosing the emoji classes of the emoji world (seeded, deterministic).

Pipeline: the ``emoji`` package's fully-qualified single-codepoint emoji (a trailing VS16 allowed)
-> drop skin tones, flags, keycaps, multi-person and text-like signs/symbols/punctuation by
codepoint and name -> keep those that render with Noto Color Emoji as one connected silhouette ->
farthest-point sampling on small RGBA thumbnails (shape + colour), with a preference for objects,
animals, food and faces -> ``num_classes`` visually distinct classes, each with a caption name,
a few aliases unique to it, its dominant colour and the background colours it stays visible on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image
from scipy import ndimage

from snapgen_app.config import ConfigBase, require
from snapgen_app.errors import ConfigError

from .render import IMAGE_SIZE, PALETTE, font_sha256, glyph_sprite, paste, solid_background, transform_sprite

VS16 = "\ufe0f"
THUMB_SIZE = 24
# A palette colour is usable as a background for a class when at most this fraction of the
# class's opaque pixels lies within FOREGROUND_DISTANCE of it (the finder would lose them).
FOREGROUND_DISTANCE = 60.0
MAX_HIDDEN_FRACTION = 0.12
MIN_CLASSES, MAX_CLASSES = 8, 400
# Emoji every class list contains (when it has room): the objects of the prompts the README, the
# model card and the showcase images use, so those prompts name things the built-in model knows.
INCLUDED: tuple[str, ...] = (
    "red apple",
    "pizza",
    "dog",
    "unicorn",
    "shark",
    "sailboat",
    "ghost",
    "banana",
    "mushroom",
    "airplane",
    "sun",
    "dolphin",
    "crown",
    "zebra",
)
MIN_BACKGROUNDS = 4  # a class must show on at least this many palette colours

_EXCLUDED_RANGES = (
    (0x1F1E6, 0x1F1FF),  # regional indicators (flags)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0x1F9B0, 0x1F9B3),  # hair components
    (0x2648, 0x2653),  # zodiac signs
    (0x1F550, 0x1F567),  # clock faces: near-identical, read like text
    (0x1F7E0, 0x1F7F0),  # coloured circles/squares, heavy equals sign
    (0x1F500, 0x1F53D),  # arrows, media controls, geometric symbols
)
_EXCLUDED_CHARS = {0x20E3, 0x00A9, 0x00AE, 0x2122, 0x3030, 0x303D, 0x3297, 0x3299, 0x1F4AF}
_EXCLUDED_WORDS = re.compile(
    r"\b("
    # flags, keycaps, skin tones
    r"flag|flags|keycap|skin tone|"
    # multi-person
    r"people|couple|family|men|women|kiss|holding hands|dancers|wrestling|bunny ears|busts|"
    # text-like signs, symbols and punctuation
    r"button|sign|symbol|mark|arrow|arrows|circle|square|triangle|diamond|ideograph|letter|letters|"
    r"input|exclamation|question|copyright|registered|infinity|zzz|heart|hearts|o.clock|thirty|"
    r"repeat|shuffle|dollar|currency|om|yin yang|cross|star and crescent|dharma|khanda|star of david|"
    r"atom|radioactive|biohazard|recycling|fleur-de-lis|trident|beginner|prohibited|no entry|warning|"
    r"crossing|restroom|room|water closet|passport|customs|baggage|luggage|potable|litter|wheelchair|"
    r"plus|minus|divide|multiply|equals|wavy dash|loop|asterisk|sparkle|check|bangbang|vibration|"
    r"mobile phone off|female|male|transgender|medical|cinema|antenna|chart|speech|thought|bubble|"
    r"hole|ophiuchus|place of worship|hundred|wireless"
    r")\b"
)
_FACE_RANGES = (
    (0x1F600, 0x1F637),
    (0x1F641, 0x1F644),
    (0x1F910, 0x1F92F),
    (0x1F970, 0x1F97A),
    (0x1FAE0, 0x1FAE8),
)
_ANIMAL_RANGES = (
    (0x1F400, 0x1F43D),
    (0x1F980, 0x1F9AE),
    (0x1FAB0, 0x1FABD),
    (0x1F54A, 0x1F54A),
    (0x1F577, 0x1F578),
)
_FOOD_RANGES = (
    (0x1F32D, 0x1F37F),
    (0x1F950, 0x1F96F),
    (0x1F9C0, 0x1F9CB),
    (0x1FAD0, 0x1FADB),
    (0x2615, 0x2615),
)
_PERSON_RANGES = (
    (0x1F466, 0x1F478),
    (0x1F481, 0x1F487),
    (0x1F645, 0x1F64F),
    (0x1F6B4, 0x1F6B6),
    (0x1F3C3, 0x1F3CC),
    (0x1F926, 0x1F926),
    (0x1F930, 0x1F93E),
    (0x1F9CD, 0x1F9DF),
)
_BODY_RANGES = (
    (0x1F440, 0x1F450),
    (0x1F90C, 0x1F91F),
    (0x1FAF0, 0x1FAF8),
    (0x270A, 0x270D),
    (0x261D, 0x261D),
)
# FPS multiplies a candidate's distance by this weight: objects, animals, food and faces come first.
CATEGORY_WEIGHT = {"face": 1.0, "animal": 1.0, "food": 1.0, "object": 1.0, "person": 0.7, "body": 0.7}
_ALIAS_STOPWORDS = {"face", "man", "woman", "person", "stop", "arts", "gesture", "springs", "ground", "side"}


@dataclasses.dataclass(frozen=True)
class EmojiClass(ConfigBase):
    """One class of the emoji world.

    codepoint: hex like "1F34E"; char: the emoji string (with VS16 when fully-qualified needs it);
    name: the caption name ("red apple"); aliases: other names unique to this class;
    dominant_color: RGB of the most common colour; backgrounds: palette names it stays visible on.
    """

    codepoint: str
    char: str
    name: str
    aliases: tuple[str, ...]
    category: str
    dominant_color: tuple[int, int, int]
    backgrounds: tuple[str, ...]

    def validate(self) -> None:
        require(bool(self.name), "EmojiClass.name", "must not be empty")
        require(len(self.backgrounds) >= 1, "EmojiClass.backgrounds", "needs at least one colour")
        unknown = set(self.backgrounds) - set(PALETTE)
        require(
            not unknown, "EmojiClass.backgrounds", f"unknown colours {sorted(unknown)}", allowed=list(PALETTE)
        )


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An emoji that passed the filters, before sampling."""

    char: str
    name: str
    aliases: tuple[str, ...]
    category: str


def _clean_name(raw: str) -> str:
    """':red_apple:' -> 'red apple' (lowercase: the MiniLM tokenizer is uncased anyway)."""
    text = raw.strip(":").replace("_", " ").replace("\u2019", "'")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # piñata -> pinata
    return re.sub(r"\s+", " ", text).strip().lower()


def _in_ranges(codepoint: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= codepoint <= hi for lo, hi in ranges)


def category_of(codepoint: int, name: str) -> str:
    """Coarse category from Unicode blocks and the name: face/animal/food/person/body/object."""
    if _in_ranges(codepoint, _PERSON_RANGES):
        return "person"
    if _in_ranges(codepoint, _FACE_RANGES) or re.search(r"\bface\b", name):
        return "face"
    if _in_ranges(codepoint, _ANIMAL_RANGES):
        return "animal"
    if _in_ranges(codepoint, _FOOD_RANGES):
        return "food"
    if _in_ranges(codepoint, _BODY_RANGES) or re.search(r"\b(hand|hands|finger|fist|thumbs)\b", name):
        return "body"
    return "object"


def is_excluded(char: str, name: str) -> bool:
    """True for skin tones, flags, keycaps, multi-person and text-like sign/symbol emoji."""
    codepoints = [ord(c) for c in char if c != VS16]
    if len(codepoints) != 1:
        return True  # ZWJ sequences, keycaps, flags and skin-tone sequences are multi-codepoint
    codepoint = codepoints[0]
    if codepoint in _EXCLUDED_CHARS or _in_ranges(codepoint, _EXCLUDED_RANGES):
        return True
    if codepoint < 0x2000 or re.search(r"\d", name):  # digits, '#', '*', '1st place medal'
        return True
    return bool(_EXCLUDED_WORDS.search(name))


def candidate_emoji() -> list[Candidate]:
    """Fully-qualified single-codepoint emoji from the ``emoji`` package, minus the excluded kinds.

    Ordered by codepoint so the result does not depend on the package's dict order.
    """
    import emoji  # the training extra; imported late so the module imports without it

    fully_qualified = emoji.STATUS["fully_qualified"]
    found: list[Candidate] = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified:
            continue
        name = _clean_name(data["en"])
        if is_excluded(char, name):
            continue
        aliases = tuple(
            dict.fromkeys(_clean_name(a) for a in data.get("alias", []) if _clean_name(a) != name)
        )
        codepoint = ord(char.replace(VS16, ""))
        found.append(Candidate(char, name, aliases, category_of(codepoint, name)))
    return sorted(found, key=lambda c: ord(c.char[0]))


def is_single_silhouette(sprite: np.ndarray, min_fraction: float = 0.97) -> bool:
    """True when the glyph's alpha mask (at 48 px) is one connected piece with >= min_fraction of it.

    Multi-part glyphs (sparkles, musical notes) would be split by the eval's object finder.
    """
    small = np.asarray(Image.fromarray(sprite, "RGBA").resize((48, 48), Image.Resampling.BILINEAR))
    mask = ndimage.binary_closing(small[..., 3] > 64, structure=np.ones((3, 3)))
    labels, count = cast(tuple[np.ndarray, int], ndimage.label(mask, structure=np.ones((3, 3))))
    if count == 0:
        return False
    sizes = np.bincount(labels.ravel())[1:]
    return sizes.max() >= min_fraction * sizes.sum()


def thumbnail_features(sprite: np.ndarray) -> np.ndarray:
    """Shape + colour descriptor: the sprite padded to a square, 24x24, RGB premultiplied by alpha + alpha.

    Returns float32 [24*24*4] in [0, 1].
    """
    h, w = sprite.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 4), dtype=np.uint8)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = sprite
    thumb = np.asarray(
        Image.fromarray(square, "RGBA").resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX),
        dtype=np.float32,
    )
    alpha = thumb[..., 3:] / 255.0
    return np.concatenate([thumb[..., :3] / 255.0 * alpha, alpha], axis=-1).ravel()


def dominant_color(sprite: np.ndarray) -> tuple[int, int, int]:
    """Mean RGB of the most populated 4x4x4 colour bin among opaque pixels."""
    pixels = sprite[sprite[..., 3] > 200][:, :3].astype(np.int64)
    bins = (pixels // 64) @ np.array([16, 4, 1])
    top = np.bincount(bins).argmax()
    return tuple(int(v) for v in pixels[bins == top].mean(axis=0).round())  # type: ignore[return-value]


def visible_backgrounds(sprite: np.ndarray) -> tuple[str, ...]:
    """Palette colours on which at most MAX_HIDDEN_FRACTION of the glyph blends into the background.

    Measured on a 48 px copy: the fraction of opaque pixels within FOREGROUND_DISTANCE of each colour.
    """
    small = np.asarray(Image.fromarray(sprite, "RGBA").resize((48, 48), Image.Resampling.NEAREST))
    pixels = small[small[..., 3] > 200][:, :3].astype(np.float32)
    table = np.asarray(list(PALETTE.values()), dtype=np.float32)
    dist = np.sqrt(((pixels[:, None, :] - table[None, :, :]) ** 2).sum(-1))  # [pixels, colours]
    hidden = (dist < FOREGROUND_DISTANCE).mean(axis=0)
    return tuple(name for name, frac in zip(PALETTE, hidden, strict=True) if frac <= MAX_HIDDEN_FRACTION)


def farthest_point_sampling(
    features: np.ndarray,
    weights: np.ndarray,
    count: int,
    seed: int,
    accept: Callable[[int], bool] = lambda _: True,
    first: Sequence[int] = (),
) -> list[int]:
    """Indices of ``count`` rows of ``features`` [N, D] chosen greedily far from those already chosen.

    ``first`` rows are chosen before any other (those ``accept`` refuses raise ValueError). Then the
    next pick is random among the highest-weight rows (seeded); each next pick maximises
    weight * (distance to the nearest chosen row). A pick that ``accept`` refuses is skipped for good.
    Deterministic for a seed. Raises ValueError when fewer than ``count`` rows are accepted.
    """
    rng = np.random.default_rng(seed)
    features = features.astype(np.float32)
    weights = weights.astype(np.float64).copy()
    chosen: list[int] = []
    nearest = np.full(len(features), np.inf, dtype=np.float32)
    for pick in dict.fromkeys(first):
        if len(chosen) == count:
            break
        if not accept(pick):
            raise ValueError(f"row {pick} is required but not accepted")
        weights[pick] = 0.0
        chosen.append(pick)
        nearest = np.minimum(nearest, np.sqrt(((features - features[pick]) ** 2).sum(axis=1)))
    forced = len(chosen)
    while len(chosen) < count:
        if len(chosen) == forced:
            top = np.flatnonzero(weights == weights.max())
            pick = int(rng.choice(top))
        else:
            score = np.where(weights > 0, nearest * weights, -1.0)
            pick = int(np.argmax(score))
            if score[pick] < 0:
                raise ValueError(f"only {len(chosen)} of {count} rows accepted")
        weights[pick] = 0.0  # never again, accepted or not
        if not accept(pick):
            continue
        chosen.append(pick)
        nearest = np.minimum(nearest, np.sqrt(((features - features[pick]) ** 2).sum(axis=1)))
    return chosen


def finder_backgrounds(sprite: np.ndarray, backgrounds: tuple[str, ...]) -> tuple[str, ...]:
    """Those ``backgrounds`` on which the eval's object finder sees the glyph as exactly one object.

    Checked at 56 and 104 px, unrotated, centred: low-contrast parts (smoke, cables) split a glyph.
    """
    from .finder import Background, find_objects  # local: finder is the eval's, curation only borrows it

    ok = []
    for name in backgrounds:
        rgb = PALETTE[name]
        seen_once = True
        for size in (56, 104):
            canvas = solid_background(rgb)
            glyph = transform_sprite(sprite, size)
            paste(canvas, glyph, (IMAGE_SIZE - glyph.width) // 2, (IMAGE_SIZE - glyph.height) // 2)
            boxes = find_objects(
                np.asarray(canvas), Background((float(rgb[0]), float(rgb[1]), float(rgb[2])), name, 1.0)
            )
            seen_once = seen_once and len(boxes) == 1
        if seen_once:
            ok.append(name)
    return tuple(ok)


def _squash(text: str) -> str:
    return re.sub(r"[^a-z]", "", text)


def _alias_proposals(name: str, own: tuple[str, ...]) -> tuple[str, ...]:
    """Package aliases that are not just the name squashed ('fuelpump'), plus the head noun of
    two-word names ('maple leaf' -> 'leaf')."""
    keep = [
        a
        for a in own
        if re.fullmatch(r"[a-z][a-z' -]*", a)
        and _squash(a) != _squash(name)
        and len(a.split()) <= 4
        and not _EXCLUDED_WORDS.search(a)
    ]
    words = name.split()
    if len(words) == 2 and words[1] not in _ALIAS_STOPWORDS and len(words[1]) > 2:
        keep.append(words[1])
    return tuple(dict.fromkeys(keep))


def _unique_aliases(
    names: list[str], aliases: list[tuple[str, ...]], max_aliases: int
) -> list[tuple[str, ...]]:
    """Per class, the alias proposals that no other class uses as a name or alias (at most max_aliases)."""
    proposals = [_alias_proposals(n, a) for n, a in zip(names, aliases, strict=True)]
    counts: dict[str, int] = {}
    for text in [*names, *(a for p in proposals for a in p)]:
        counts[text] = counts.get(text, 0) + 1
    return [tuple(a for a in p if counts[a] == 1)[:max_aliases] for p in proposals]


@functools.lru_cache(maxsize=1)
def _usable_candidates() -> tuple[tuple[Candidate, np.ndarray], ...]:
    """Candidates that render as one silhouette visible on at least 4 palette colours (seed-independent)."""
    usable = []
    for cand in candidate_emoji():
        sprite = glyph_sprite(cand.char)
        if (
            sprite is None
            or not is_single_silhouette(sprite)
            or len(visible_backgrounds(sprite)) < MIN_BACKGROUNDS
        ):
            continue
        usable.append((cand, sprite))
    return tuple(usable)


def curate(
    num_classes: int = 200, seed: int = 0, max_aliases: int = 3, include: Sequence[str] = INCLUDED
) -> list[EmojiClass]:
    """The ``num_classes`` classes of the emoji world for ``seed`` (deterministic for a seed and font).

    The emoji named in ``include`` are chosen first (as many as fit in ``num_classes``), the rest by
    farthest-point sampling. Raises ConfigError when num_classes is outside [8, 400] or more than
    the candidates available, or when an included name is not a usable emoji.
    """
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ConfigError(
            "num_classes", f"{num_classes} is out of range", allowed=f"{MIN_CLASSES}..{MAX_CLASSES}"
        )
    usable = _usable_candidates()
    if num_classes > len(usable):
        raise ConfigError("num_classes", f"only {len(usable)} emoji qualify", allowed=f"<= {len(usable)}")
    features = np.stack([thumbnail_features(s) for _, s in usable])
    weights = np.asarray([CATEGORY_WEIGHT[c.category] for c, _ in usable])
    index_of = {c.name: i for i, (c, _) in enumerate(usable)}
    missing = [name for name in include if name not in index_of]
    if missing:
        raise ConfigError(
            "include", f"{missing} are not usable emoji names (one silhouette, visible on enough colours)"
        )
    backgrounds: dict[int, tuple[str, ...]] = {}

    def accept(index: int) -> bool:
        sprite = usable[index][1]
        backgrounds[index] = finder_backgrounds(sprite, visible_backgrounds(sprite))
        return len(backgrounds[index]) >= MIN_BACKGROUNDS

    try:
        picked = sorted(
            farthest_point_sampling(
                features, weights, num_classes, seed, accept, first=[index_of[n] for n in include]
            )
        )
    except ValueError as exc:
        raise ConfigError("num_classes", f"too many classes requested ({exc})") from None
    names = [usable[i][0].name for i in picked]
    aliases = _unique_aliases(names, [usable[i][0].aliases for i in picked], max_aliases)
    classes = []
    for index, alias in zip(picked, aliases, strict=True):
        cand, sprite = usable[index]
        classes.append(
            EmojiClass(
                codepoint=f"{ord(cand.char[0]):X}",
                char=cand.char,
                name=cand.name,
                aliases=alias,
                category=cand.category,
                dominant_color=dominant_color(sprite),
                backgrounds=backgrounds[index],
            )
        )
    return classes


def save_classes(classes: list[EmojiClass], path: str | Path, *, seed: int | None = None) -> None:
    """Write the class list as JSON: {format_version, seed, font_sha256, classes: [...]}."""
    payload = {
        "format_version": 1,
        "seed": seed,
        "font_sha256": font_sha256(),
        "classes": [c.to_dict() for c in classes],
    }
    Path(path).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_classes(path: str | Path) -> list[EmojiClass]:
    """Read a class list written by :func:`save_classes`; unknown keys raise ConfigError."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            str(path), f"cannot read class list ({exc})", hint="run the dataset builder"
        ) from None
    unknown = set(raw) - {"format_version", "seed", "font_sha256", "classes"}
    if unknown or raw.get("format_version") != 1:
        raise ConfigError(str(path), f"not a class list of format_version 1 (unknown keys {sorted(unknown)})")
    return [EmojiClass.from_dict(c) for c in raw["classes"]]

"""Rendering emoji glyphs with Noto Color Emoji, the background palette, and crops.

Noto Color Emoji is a bitmap (CBDT) font: FreeType only scales it at its strike size, 109, so
every glyph is rendered once at 109 px as an RGBA sprite (cropped to its alpha box) and resized
afterwards. Everything here works on numpy arrays (HxWx3 or HxWx4 uint8) and PIL images; no torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from snapgen_app.errors import SnapGenError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive), pixels
FONT_ENV = "SNAPGEN_EMOJI_FONT"
FONT_STRIKE_SIZE = 109  # the only size the bitmap font supports
IMAGE_SIZE = 128
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian/Ubuntu fonts-noto-color-emoji
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch noto-fonts-emoji
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
)

# Named background colours; captions say the name, the eval maps a border back to the nearest one.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (245, 140, 30),
    "yellow": (250, 220, 50),
    "green": (50, 160, 70),
    "blue": (40, 90, 210),
    "purple": (130, 60, 180),
    "pink": (245, 150, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)


class FontNotFoundError(SnapGenError):
    """The Noto Color Emoji font file is missing."""


def font_path() -> Path:
    """Path of NotoColorEmoji.ttf: $SNAPGEN_EMOJI_FONT, else the usual system locations."""
    override = os.environ.get(FONT_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FontNotFoundError(
                f"{FONT_ENV}={override} is not a file", hint="point it at NotoColorEmoji.ttf"
            )
        return path
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FontNotFoundError(
        "Noto Color Emoji font not found in " + ", ".join(FONT_CANDIDATES),
        hint=f"install it (Debian/Ubuntu: apt-get install fonts-noto-color-emoji) or set {FONT_ENV}",
    )


@functools.lru_cache(maxsize=1)
def font_sha256() -> str:
    """sha256 of the font file, recorded with datasets so renders can be traced to a font version."""
    return hashlib.sha256(font_path().read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), FONT_STRIKE_SIZE)


@functools.lru_cache(maxsize=4096)
def glyph_sprite(char: str) -> np.ndarray | None:
    """RGBA uint8 sprite [h, w, 4] of one emoji at 109 px, cropped to its alpha box; None if blank.

    A glyph the font lacks renders as nothing (Pillow draws an empty .notdef), hence None.
    """
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), char, font=_font(), embedded_color=True)
    rgba = np.asarray(canvas)
    ys, xs = np.nonzero(rgba[..., 3] > 8)
    if len(xs) == 0:
        return None
    return np.ascontiguousarray(rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def transform_sprite(sprite: np.ndarray, size: int, angle: float = 0.0) -> Image.Image:
    """Resize an RGBA sprite so its longer side is ``size`` px, rotate by ``angle`` degrees, crop tight.

    Returns an RGBA PIL image whose alpha box is the emoji's visible extent.
    """
    h, w = sprite.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(sprite, "RGBA").resize((new_w, new_h), Image.Resampling.LANCZOS)
    if abs(angle) > 0.01:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    ys, xs = np.nonzero(np.asarray(image.getchannel("A")) > 8)
    if len(xs) == 0:
        return image
    return image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def solid_background(color: tuple[int, int, int], size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB PIL image of ``size`` x ``size`` filled with ``color``."""
    return Image.new("RGB", (size, size), tuple(int(c) for c in color))


def jitter_color(color: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    """``color`` with each channel moved by up to ``amount`` (uniform, clipped to 0..255)."""
    if amount <= 0:
        return color
    moved = np.asarray(color) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(moved, 0, 255))  # type: ignore[return-value]


def paste(canvas: Image.Image, sprite: Image.Image, x0: int, y0: int) -> Box:
    """Alpha-composite ``sprite`` onto ``canvas`` (in place) at (x0, y0); returns its box (x0, y0, x1, y1).

    The box is clipped to the canvas; x1/y1 are exclusive.
    """
    x0, y0 = int(x0), int(y0)
    canvas.paste(sprite, (x0, y0), sprite)
    w, h = sprite.size
    return (max(0, x0), max(0, y0), min(canvas.width, x0 + w), min(canvas.height, y0 + h))


def render_variant(
    char: str,
    rng: np.random.Generator,
    background: str,
    *,
    size_range: tuple[int, int] = (56, 104),
    max_angle: float = 12.0,
    bg_jitter: int = 6,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One 128x128 RGB uint8 render of a single emoji: random scale, shift and small rotation.

    Returns (image [128, 128, 3] uint8, box (x0, y0, x1, y1)).
    """
    sprite = glyph_sprite(char)
    if sprite is None:
        raise SnapGenError(f"emoji {char!r} does not render with {font_path()}", hint="pick another class")
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    image = transform_sprite(sprite, size, float(rng.uniform(-max_angle, max_angle)))
    canvas = solid_background(jitter_color(PALETTE[background], rng, bg_jitter))
    x0 = int(rng.integers(0, max(1, IMAGE_SIZE - image.width + 1)))
    y0 = int(rng.integers(0, max(1, IMAGE_SIZE - image.height + 1)))
    box = paste(canvas, image, x0, y0)
    return np.asarray(canvas), box


def square_crop(
    image: np.ndarray, box: tuple[int, int, int, int], out_size: int, margin: float = 0.12
) -> np.ndarray:
    """Square crop around ``box`` (x0, y0, x1, y1) with ``margin`` on each side, resized to out_size.

    image: [H, W, 3] uint8. Parts outside the image are filled by edge replication (the background).
    Returns [out_size, out_size, 3] uint8. Shared by classifier training and the eval so both see
    the same framing.
    """
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin) + 2.0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = round(cx - side / 2.0), round(cy - side / 2.0)
    side_px = max(2, round(side))
    h, w = image.shape[:2]
    pad = max(0, -left, -top, left + side_px - w, top + side_px - h)
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        left, top = left + pad, top + pad
    crop = image[top : top + side_px, left : left + side_px]
    return np.asarray(Image.fromarray(crop).resize((out_size, out_size), Image.Resampling.BILINEAR))


def nearest_palette_color(rgb: np.ndarray | tuple[float, float, float]) -> tuple[str, float]:
    """Name of the palette colour nearest to ``rgb`` (Euclidean in RGB) and its distance."""
    names = list(PALETTE)
    table = np.asarray([PALETTE[n] for n in names], dtype=np.float64)
    dist = np.linalg.norm(table - np.asarray(rgb, dtype=np.float64)[None, :], axis=1)
    best = int(np.argmin(dist))
    return names[best], float(dist[best])

"""A simple object finder for emoji-world images: background from the border, objects as blobs.

Background colour = median of the border pixels; the image's background counts as *uniform* when most
border pixels lie near that median. Foreground = pixels far from the background colour, cleaned
(opening removes speckle, closing + hole filling joins a glyph's parts), labelled into
8-connected components; small blobs are dropped and boxes that touch are merged. numpy + scipy only.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np
from scipy import ndimage

from .render import Box, nearest_palette_color

BORDER = 3  # px of border used for the background estimate
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class FinderConfig:
    """Thresholds of the finder (RGB distances in 0..441, areas in px of a 128x128 image)."""

    fg_distance: float = 60.0  # a pixel this far from the background colour is foreground
    min_area: int = 40  # smaller blobs are noise
    merge_gap: int = 1  # boxes closer than this many px are one object
    uniform_distance: float = 40.0  # border pixels this near the median count as background
    uniform_fraction: float = 0.6  # share of such border pixels for a uniform background
    max_palette_distance: float = 110.0  # farther than this from every palette colour: no colour
    max_objects: int = 8


DEFAULT_FINDER = FinderConfig()


@dataclasses.dataclass(frozen=True)
class Background:
    """Estimated background: median border RGB, nearest palette name (None when not uniform or too
    far from every palette colour) and the share of border pixels near the median."""

    rgb: tuple[float, float, float]
    color: str | None
    uniform_fraction: float


def border_pixels(image: np.ndarray, width: int = BORDER) -> np.ndarray:
    """The outer ``width`` px ring of an [H, W, 3] image as [N, 3] float32."""
    img = image.astype(np.float32)
    return np.concatenate(
        [
            img[:width].reshape(-1, 3),
            img[-width:].reshape(-1, 3),
            img[width:-width, :width].reshape(-1, 3),
            img[width:-width, -width:].reshape(-1, 3),
        ]
    )


def estimate_background(image: np.ndarray, config: FinderConfig = DEFAULT_FINDER) -> Background:
    """Background of an [H, W, 3] uint8 image from its border."""
    ring = border_pixels(image)
    median = np.median(ring, axis=0)
    near = float(np.mean(np.linalg.norm(ring - median, axis=1) < config.uniform_distance))
    name, distance = nearest_palette_color(median)
    uniform = near >= config.uniform_fraction and distance <= config.max_palette_distance
    return Background(tuple(float(v) for v in median), name if uniform else None, near)  # type: ignore[arg-type]


def foreground_mask(
    image: np.ndarray, background_rgb: tuple[float, float, float], config: FinderConfig
) -> np.ndarray:
    """Boolean [H, W]: pixels farther than fg_distance from the background, cleaned and hole-filled."""
    distance = np.linalg.norm(
        image.astype(np.float32) - np.asarray(background_rgb, dtype=np.float32), axis=-1
    )
    mask = distance > config.fg_distance
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), dtype=bool))
    mask = ndimage.binary_closing(mask, structure=_EIGHT, iterations=1)
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def _touching(a: Box, b: Box, gap: int) -> bool:
    return a[0] <= b[2] + gap and b[0] <= a[2] + gap and a[1] <= b[3] + gap and b[1] <= a[3] + gap


def _merge_boxes(boxes: list[tuple[Box, int]], gap: int) -> list[tuple[Box, int]]:
    """Union boxes (with their areas) that overlap or lie within ``gap`` px, until none do."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                (a, area_a), (b, area_b) = merged[i], merged[j]
                if _touching(a, b, gap):
                    union = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    merged[i] = (union, area_a + area_b)
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def find_objects(
    image: np.ndarray, background: Background | None = None, config: FinderConfig = DEFAULT_FINDER
) -> list[Box]:
    """Boxes (x0, y0, x1, y1), x1/y1 exclusive, of the objects in an [H, W, 3] uint8 image, largest first."""
    background = background or estimate_background(image, config)
    mask = foreground_mask(image, background.rgb, config)
    labels, count = cast(tuple[np.ndarray, int], ndimage.label(mask, structure=_EIGHT))
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    found: list[tuple[Box, int]] = []
    for label, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None or areas[label] < config.min_area:
            continue
        ys, xs = slices
        found.append(((xs.start, ys.start, xs.stop, ys.stop), int(areas[label])))
    found = _merge_boxes(found, config.merge_gap)
    found.sort(key=lambda item: -item[1])
    return [box for box, _ in found[: config.max_objects]]

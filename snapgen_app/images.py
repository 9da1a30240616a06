"""Pictures people bring to training, read as the RGB they see in an image viewer.

``Image.convert("RGB")`` alone is wrong for three common kinds of file: a phone photo stored
sideways with an EXIF orientation tag (trained rotated), a transparent PNG (transparent pixels,
often stored as black, become a black background) and a 16-bit PNG (Pillow clips every value
above 255 to white). The wizard's folder check and the trainers' loaders all read through here.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# What opening or decoding a file that is not a usable picture raises: damaged or truncated files,
# other formats, and pictures over Pillow's decompression-bomb limit (about 179 megapixels).
UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)

# Transparent pixels are laid onto white, the background a viewer or a web page shows.
BACKGROUND = (255, 255, 255)

# EXIF orientations 5-8 turn the picture a quarter: its stored width is its shown height.
_TRANSPOSED = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied), transparency flattened onto white, 16-bit
    samples (Pillow's modes I;16 and I) scaled to 8 bits, in mode RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") and image.mode != "I;16":
        image = image.convert("I")  # big-endian TIFF scans (I;16B): point() takes I, I;16 and F only
    if image.mode in ("I;16", "I"):
        # 16-bit samples (PNG stores them big-endian; Pillow opens grey ones as I;16 or I).
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def checked_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the picture file at ``path`` as shown (its EXIF orientation applied),
    after Pillow's integrity check, without decoding the pixels; raises one of :data:`UNREADABLE`."""
    with Image.open(path) as image:
        image.verify()  # must come first after opening, and leaves the image unusable
    with Image.open(path) as image:
        width, height = image.size
        orientation = None
        # A PNG's EXIF chunk may follow its pixels, and Pillow decodes the whole image to find it:
        # only one whose header already holds EXIF is read (phone photos are JPEG/HEIF/WebP).
        if image.format != "PNG" or "exif" in image.info:
            try:
                orientation = image.getexif().get(_ORIENTATION_TAG)
            except Exception:  # a damaged EXIF block: Pillow shows the pixels as stored
                orientation = None
    return (height, width) if orientation in _TRANSPOSED else (width, height)

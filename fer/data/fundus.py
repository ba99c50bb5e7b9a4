"""One image file -> one square uint8 RGB array, the way a fundus photograph needs it.

A fundus photograph is a bright disc (the retina) on a black border, often wider than high
and cut off at the top and bottom. Squashing it to a square makes the retina an ellipse, so
`LOAD_CROPS["retina"]` (the default) finds the disc on a small copy (max channel above
`BORDER_LEVEL`), crops to its bounding box and pads to a square with black: the retina stays
round and centred. `LOAD_FILTERS["graham"]` is Ben Graham's Kaggle DR preprocessing (2015):
subtract the local average colour, map it to grey, and blank the rim.

Files in any mode load the same way: EXIF orientation applied, palette / alpha / CMYK /
grayscale converted to RGB, 16-bit grayscale scaled down (not clipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from fer import names
from fer.names import check_registry

# The black border of fundus cameras is not quite 0 (JPEG noise, vignetting): 12 of 255
# separates it from the darkest retina in DDR / EyePACS photographs.
BORDER_LEVEL = 12
# A row or column belongs to the retina when at least this share of it is brighter than
# BORDER_LEVEL (a few hot pixels or a burnt-in caption in the border do not widen the box).
BORDER_SHARE = 0.02
FIND_SIDE = 256  # the retina is found on a copy at most this large
# Larger files are refused before decoding (decompression bombs); Pillow's own limit.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Graham (2015) blurs with sigma = radius / 30 and keeps the disc inside 0.9 of the radius
# (the blur leaves a bright ring at the rim): github.com/btgraham/SparseConvNet, Kaggle DR.
GRAHAM_SIGMA_PER_RADIUS = 1 / 30
GRAHAM_DISC = 0.9


def retina_box(im: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bright disc; the whole image when none is found."""
    small = im.copy()
    small.thumbnail((FIND_SIDE, FIND_SIDE))
    bright = np.asarray(small).max(axis=2) > BORDER_LEVEL
    rows = np.flatnonzero(bright.mean(axis=1) >= BORDER_SHARE)
    cols = np.flatnonzero(bright.mean(axis=0) >= BORDER_SHARE)
    if len(rows) == 0 or len(cols) == 0:
        return 0, 0, im.width, im.height
    sx, sy = im.width / small.width, im.height / small.height
    return (int(cols[0] * sx), int(rows[0] * sy),
            min(im.width, int(np.ceil((cols[-1] + 1) * sx))), min(im.height, int(np.ceil((rows[-1] + 1) * sy))))


def pad_square(im: Image.Image) -> Image.Image:
    """Centre `im` on a black square of its longer side."""
    side = max(im.size)
    if im.width == im.height:
        return im
    square = Image.new("RGB", (side, side))
    square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return square


def crop_retina(im: Image.Image, size: int) -> Image.Image:
    """Crop to the retina, pad to a square, resize: the disc stays round and centred."""
    square = pad_square(im.crop(retina_box(im)))
    return square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def squash(im: Image.Image, size: int) -> Image.Image:
    """Resize the whole image to a square (aspect ratio not kept)."""
    return im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def graham(image: np.ndarray) -> np.ndarray:
    """4 * image - 4 * GaussianBlur(image) + 128, grey (128) outside the central disc."""
    size = image.shape[0]
    blur = Image.fromarray(image).filter(ImageFilter.GaussianBlur(GRAHAM_SIGMA_PER_RADIUS * size / 2))
    out = np.clip(4 * image.astype(np.int16) - 4 * np.asarray(blur, np.int16) + 128, 0, 255).astype(np.uint8)
    yy, xx = np.ogrid[:size, :size]
    centre = (size - 1) / 2
    outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (GRAHAM_DISC * size / 2) ** 2
    out[outside] = 128
    return out


def no_filter(image: np.ndarray) -> np.ndarray:
    return image


LOAD_CROPS: dict[str, Callable[[Image.Image, int], Image.Image]] = {"retina": crop_retina, "squash": squash}
LOAD_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": no_filter, "graham": graham}
check_registry(LOAD_CROPS, names.LOAD_CROPS, "fer.data.fundus.LOAD_CROPS")
check_registry(LOAD_FILTERS, names.LOAD_FILTERS, "fer.data.fundus.LOAD_FILTERS")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB: 16/32-bit grayscale scaled to 8 bits, transparency onto black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(1.0, float(values.max()))
        return Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def load_fundus(path: Path, size: int, crop: str = "retina", filter: str = "none") -> np.ndarray:
    """One image file -> uint8 RGB (size, size, 3). Raises (OSError, ValueError, ...) on a
    file Pillow cannot read and ValueError on one over `MAX_PIXELS`."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels is over the {MAX_PIXELS} allowed "
                             f"(a decompression bomb, or a scan far larger than a fundus photograph)")
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
        im.load()  # a truncated file raises here, not later
        rgb = to_rgb(ImageOps.exif_transpose(im))
    return LOAD_FILTERS[filter](np.asarray(LOAD_CROPS[crop](rgb, size), dtype=np.uint8))

"""Decoding any PIL-readable image, in any mode, to 8-bit RGB.

Shared by the training data pipeline and the HTTP service so that both see the same pixels."""
from __future__ import annotations

import numpy as np
from PIL import Image

# PIL's own guard against decompression bombs raises above 2x this; we make it explicit.
DEFAULT_MAX_PIXELS = 64_000_000


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of ``image`` whatever its mode.

    - 16-bit and 32-bit grey (``I;16``, ``I``, ``F``) are rescaled to 0..255 instead of being
      clipped (PIL's ``convert`` clips them, which turns most 16-bit images white);
    - transparency (``RGBA``, ``LA``, ``P`` with a transparent index) is composited on white;
    - ``CMYK``, ``YCbCr``, ``1``, ``L``, ``P`` go through PIL's conversions.
    For animated images (GIF, WebP) the caller's current frame (the first one) is used."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = array / 257.0
        else:
            low, high = float(array.min()), float(array.max())
            if 0.0 <= low and high <= 255.0:
                scaled = array
            elif 0.0 <= low and high <= 65535.0:
                scaled = array / 257.0
            else:
                scaled = (array - low) / max(high - low, 1e-12) * 255.0
        grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def open_rgb(path_or_file, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_min_side: int | None = None) -> Image.Image:
    """Open, fully decode (so truncation shows here, not later) and convert to RGB.

    ``draft_min_side``: let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, far
    cheaper than decoding every pixel) while both sides stay at least this long; for training,
    whose transforms start by resizing the shorter side to that length anyway.
    Raises ``ValueError`` for images over ``max_pixels`` and PIL's own errors for files that
    are not images or are damaged."""
    with Image.open(path_or_file) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
        image.seek(0)
        if draft_min_side and image.format == "JPEG":
            image.draft(image.mode, (draft_min_side, draft_min_side))
        image.load()
        return to_rgb(image)

"""From uploaded bytes to the float32 array a model takes.

Decoding is defensive (uploads are untrusted): every failure becomes :class:`BadInput` with
an HTTP status and a message for the client, never an exception that crashes a worker.
Preprocessing reproduces the training pipeline's ``eval_transform`` (torchvision ``Resize``
of the shorter side with PIL bilinear, ``CenterCrop``, ``ToTensor``, ``Normalize``) in
numpy + PIL, so the service does not need torch and serves exactly the pixels the model
was validated on."""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from compress.imaging import to_rgb


class BadInput(ValueError):
    """A request the client must fix: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


INLINE_DECODE_PIXELS = 1_000_000
"""Uploads up to this many pixels in all are decoded on the event loop (well under a
millisecond each); larger ones in a worker thread, so a big image never stalls the loop."""


def header_pixels(data: bytes) -> int:
    """Pixel count from the image header, without decoding; 0 when the header is unreadable
    (decoding then fails at once with the right message)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return width * height


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode an upload to 8-bit RGB (first frame of animations), or raise :class:`BadInput`.

    The pixel limit is checked from the header, before any pixel is decoded, so a small file
    that expands to gigabytes (a decompression bomb) costs nothing."""
    if not data:
        raise BadInput(f"{name}: empty upload (0 bytes)")
    if len(data) > max_bytes:
        raise BadInput(f"{name}: upload of {len(data)} bytes is over the limit of {max_bytes} bytes", status=413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadInput(f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
                               f"{max_pixels} pixels")
            image.seek(0)
            image.load()
            return to_rgb(image)
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard (over 2x Image.MAX_IMAGE_PIXELS)
        raise BadInput(f"{name}: image over the pixel limit (decompression bomb?): {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadInput(f"{name}: not an image, or a format that cannot be read (send JPEG, PNG, WebP, BMP or GIF)") from None
    except Exception as exc:  # truncated/corrupt files surface as OSError, SyntaxError, ValueError, EOFError, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{name}: damaged or truncated image ({detail})") from None


@dataclass(frozen=True)
class Preprocessing:
    """The registered model's preprocessing (same fields as ``compress.data.Preprocessing``)."""

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(int(data["input_size"]), int(data["resize"]), tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in data["std"]))  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        """Number of float32 values of one preprocessed image."""
        return 3 * self.input_size * self.input_size

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB image -> (3, input_size, input_size) float32, as torchvision's eval transform."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        crop = self.input_size
        if crop > new_w or crop > new_h:  # torchvision pads with zeros, then crops
            pad_w, pad_h = max(crop - new_w, 0), max(crop - new_h, 0)
            pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
            new_h, new_w = pixels.shape[:2]
        top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
        pixels = pixels[top:top + crop, left:left + crop]
        scaled = pixels.astype(np.float32) / np.float32(255.0)
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))


class InputLayout:
    """How the images of a request travel to the models as ONE float32 array.

    Ensemble members may differ in input size (e.g. a ResNet-18 at 224 px and a ResNet-20 at
    32 px). Each distinct preprocessing is a group; a row of the array is the concatenation
    of the image preprocessed for every group. One 2-D array keeps batching simple
    (the adaptive batcher concatenates the rows of concurrent requests)."""

    def __init__(self, preprocessings: Sequence[Preprocessing]) -> None:
        self.groups: list[Preprocessing] = []
        self.member_group: list[int] = []
        for pre in preprocessings:
            if pre not in self.groups:
                self.groups.append(pre)
            self.member_group.append(self.groups.index(pre))
        self.offsets = np.cumsum([0] + [g.size for g in self.groups]).tolist()

    @property
    def width(self) -> int:
        return int(self.offsets[-1])

    def pack(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> (N, width) float32."""
        rows = np.empty((len(images), self.width), dtype=np.float32)
        for row, image in zip(rows, images):
            for group, pre in enumerate(self.groups):
                row[self.offsets[group]:self.offsets[group + 1]] = pre(image).ravel()
        return rows

    def unpack(self, rows: np.ndarray, member: int) -> np.ndarray:
        """(N, width) -> the (N, 3, S, S) input of ``member``."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"expected an (N, {self.width}) float32 array, got shape {rows.shape}")
        group = self.member_group[member]
        size = self.groups[group].input_size
        part = rows[:, self.offsets[group]:self.offsets[group + 1]]
        return np.ascontiguousarray(part.reshape(len(rows), 3, size, size), dtype=np.float32)

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
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from compress.imaging import to_rgb


class BadInput(ValueError):
    """A request the client must fix: ``status`` is the HTTP status to answer with and
    ``reason`` one of a few fixed words (the label of the rejected-requests metric)."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_image") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


INLINE_DECODE_PIXELS = 250_000
"""Uploads whose decoding and preprocessing touch up to this many pixels (see
:meth:`InputLayout.work`; about 2.5 ms of CPU here) are decoded on the event loop, where a
small image costs less than the hop to a thread; larger ones in a worker thread, so a big
image never stalls the loop."""

ROW_COST_PIXELS = 16
"""Decoding costs per row as well as per pixel (measured: a 1 x 300,000 PNG takes 38 ms, a
1000 x 1000 one 10 ms): a row counts as at least this many pixels, both for the pixel limit
(so the 40 M limit no longer admits 1 x 40,000,000, five seconds of decoding) and for the
inline-or-thread decision."""


def decode_pixels(width: int, height: int) -> int:
    """What decoding a ``width`` x ``height`` image costs, in pixels (rows count, see above)."""
    return max(width, ROW_COST_PIXELS) * height

RESIZE_BUDGET_PIXELS = 1_000_000
"""The most pixels a resize may produce. Resizing the short side to ``resize`` turns a
1 x 300,000 image into 32 x 9,600,000 (gigabytes, seconds) although only the centre crop is
used; above this budget only the crop window is resampled (PIL's ``box``), which bounds the
work by the crop size. Below it the whole image is resized exactly as torchvision does, so
ordinary images get bit-identical pixels (PIL takes ``box`` in float32, which can move a
pixel by one level)."""


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> Image.Image:
    """An upload's header, read and checked against the limits, no pixel decoded yet (see
    :func:`decode_opened`), or :class:`BadInput`. Reading the header once serves both the
    pixel limit and the service's choice of where to decode (PIL's header parsing is about a
    third of decoding a small JPEG).

    The pixel limit is checked from the header, before any pixel is decoded, so a small file
    that expands to gigabytes (a decompression bomb) costs nothing."""
    if not data:
        raise BadInput(f"{name}: empty upload (0 bytes)", reason="empty_image")
    if len(data) > max_bytes:
        raise BadInput(f"{name}: upload of {len(data)} bytes is over the limit of {max_bytes} bytes", status=413,
                       reason="image_too_large")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise _bad_image(exc, name) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadInput(f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
                       f"{max_pixels} pixels", reason="too_many_pixels")
    if decode_pixels(width, height) > max_pixels:
        image.close()
        raise BadInput(f"{name}: image is {width}x{height}, too narrow for its height: decoding it costs as "
                       f"much as {decode_pixels(width, height)} pixels (a row counts as at least "
                       f"{ROW_COST_PIXELS}), over the limit of {max_pixels} pixels", reason="too_many_pixels")
    return image


def decode_opened(image: Image.Image, name: str = "image") -> Image.Image:
    """Decode an image from :func:`open_image` to 8-bit RGB (first frame of animations), or
    raise :class:`BadInput`; ``image`` is closed either way."""
    try:
        with image:
            image.seek(0)
            image.load()
            return to_rgb(image)
    except Exception as exc:
        raise _bad_image(exc, name) from None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode an upload to 8-bit RGB (first frame of animations), or raise :class:`BadInput`."""
    return decode_opened(open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name), name)


def _bad_image(exc: Exception, name: str) -> BadInput:
    """What a PIL failure means for the client."""
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own guard (over 2x Image.MAX_IMAGE_PIXELS)
        return BadInput(f"{name}: image over the pixel limit (decompression bomb?): {exc}", reason="too_many_pixels")
    if isinstance(exc, Image.UnidentifiedImageError):
        return BadInput(f"{name}: not an image, or a format that cannot be read (send JPEG, PNG, WebP, BMP or GIF)",
                        reason="not_an_image")
    # truncated/corrupt files surface as OSError, SyntaxError, ValueError, EOFError, ...
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BadInput(f"{name}: damaged or truncated image ({detail})", reason="damaged_image")


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

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size torchvision's ``Resize(resize)`` gives: short side ``resize``, aspect kept."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def work(self, width: int, height: int) -> int:
        """Pixels this preprocessing produces for a ``width`` x ``height`` image (bounded by
        :data:`RESIZE_BUDGET_PIXELS`: past it only the crop window is resampled)."""
        new_w, new_h = self.resized_size(width, height)
        return new_w * new_h if new_w * new_h <= RESIZE_BUDGET_PIXELS else self.input_size ** 2

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``scale``, ``offset`` with ``pixel * scale + offset == (pixel / 255 - mean) / std``
        (within 1e-6): one multiply-add into the output instead of four passes with
        temporaries (16 against 36 us for a 32x32 image)."""
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return (1.0 / (255.0 * std)).astype(np.float32)[:, None, None], (-mean / std).astype(np.float32)[:, None, None]

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """RGB image -> (3, input_size, input_size) float32, as torchvision's eval transform
        (written into ``out`` when given)."""
        width, height = image.size
        new_w, new_h = self.resized_size(width, height)
        crop = self.input_size
        if (new_w, new_h) != (width, height):
            if new_w * new_h > RESIZE_BUDGET_PIXELS:
                image = self._resize_crop_window(image, new_w, new_h)
            else:
                image = image.resize((new_w, new_h), Image.BILINEAR)
        new_w, new_h = image.size
        if new_w > crop or new_h > crop:  # centre crop (an axis shorter than the crop is kept whole)
            left, top = max(round((new_w - crop) / 2.0), 0), max(round((new_h - crop) / 2.0), 0)
            image = image.crop((left, top, left + min(crop, new_w), top + min(crop, new_h)))
        pixels = np.asarray(image, dtype=np.uint8)
        if crop > new_w or crop > new_h:  # torchvision pads with zeros (before cropping: the same here)
            pad_w, pad_h = max(crop - new_w, 0), max(crop - new_h, 0)
            pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        scale, offset = self._affine
        planes = pixels.transpose(2, 0, 1)
        out = np.empty(planes.shape, np.float32) if out is None else out
        np.multiply(planes, scale, out=out)
        out += offset
        return out

    def _resize_crop_window(self, image: Image.Image, new_w: int, new_h: int) -> Image.Image:
        """Only the part of the ``new_w`` x ``new_h`` resized image that the centre crop keeps
        (an axis shorter than the crop is kept whole, to be padded)."""
        crop = self.input_size

        def window(size: int, new_size: int) -> tuple[float, float, int]:
            if crop > new_size:
                return 0.0, float(size), new_size
            start = round((new_size - crop) / 2.0)
            return start * size / new_size, (start + crop) * size / new_size, crop

        x0, x1, out_w = window(image.width, new_w)
        y0, y1, out_h = window(image.height, new_h)
        return image.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x1, y1))


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
            self.fill(row, image)
        return rows

    def fill(self, row: np.ndarray, image: Image.Image) -> None:
        """Write one RGB image's row (so a batch can be decoded one image at a time)."""
        for group, pre in enumerate(self.groups):
            pre(image, out=row[self.offsets[group]:self.offsets[group + 1]].reshape(3, pre.input_size, pre.input_size))

    def work(self, width: int, height: int) -> int:
        """Pixels decoding and preprocessing a ``width`` x ``height`` image touch: decoding
        (see :func:`decode_pixels`), plus what each group's resize produces (bounded, see
        :meth:`Preprocessing.work`)."""
        if width < 1 or height < 1:  # unreadable header: decoding fails at once
            return 0
        return decode_pixels(width, height) + sum(pre.work(width, height) for pre in self.groups)

    def unpack(self, rows: np.ndarray, member: int) -> np.ndarray:
        """(N, width) -> the (N, 3, S, S) input of ``member``."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"expected an (N, {self.width}) float32 array, got shape {rows.shape}")
        group = self.member_group[member]
        size = self.groups[group].input_size
        part = rows[:, self.offsets[group]:self.offsets[group + 1]]
        return np.ascontiguousarray(part.reshape(len(rows), 3, size, size), dtype=np.float32)

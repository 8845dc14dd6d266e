"""Training data held as tensors on the training device and augmented there, whole batches at once.

Why: on a GPU, a ResNet on small images (CIFAR's 32 px) trains at tens of thousands of
images per second, while a DataLoader that decodes and augments every image with PIL on a
few CPU cores feeds a few thousand: the GPU waits. Here every image is decoded once, kept as
uint8 on the device (CIFAR-10's training set is 150 MB), and each batch is augmented with
tensor operations on the device: one ``affine_grid``/``grid_sample`` per batch does the random
resized crop, rotation and flip, with different random parameters for every image (which
torchvision's batch transforms do not: they apply one draw to the whole batch).

The loaders yield ``(images, labels)`` batches already on the device, so ``training.fit`` and
``training.evaluate`` take them as they take DataLoaders. Evaluation images are stored after
the same resize and centre crop as ``Preprocessing.eval_transform`` and normalised on the
device: the same numbers. Training images are stored as a square centre crop of side
``resize`` (the whole image for square data sets such as CIFAR), which is what the random
crop then samples from."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from .data import Augmentation, DataBundle, Preprocessing, SkippingDataLoader, class_weights
from .distributed import shard

AUTO_MAX_BYTES = 4 * 1024**3
"""``--data-on-device auto`` holds the data on a CUDA device when the stored images take at
most this much memory (CIFAR-10 at 32 px: 180 MB; an ImageNet-sized set at 256 px would not fit)."""

RATIO_RANGE = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios


def stored_bytes(bundle: DataBundle) -> int:
    """Memory the uint8 tensors of ``bundle`` take on the device."""
    pre = bundle.preprocessing
    return 3 * (len(bundle.train_labels) * pre.resize**2 + len(bundle.val_labels) * pre.input_size**2)


def use_device_data(choice: str, bundle: DataBundle, device: torch.device) -> bool:
    """``on``, ``off``, or ``auto``: on for a CUDA device when the images fit in ``AUTO_MAX_BYTES``."""
    if choice == "auto":
        return device.type == "cuda" and stored_bytes(bundle) <= AUTO_MAX_BYTES
    return choice == "on"


def _with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """A shallow copy of ``dataset`` (ImageFolder, its Subset, or the in-memory digits) that
    applies ``transform`` instead of its own."""
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    clone = copy.copy(dataset)
    clone.transform = transform  # type: ignore[attr-defined]
    return clone


def decode_labelled(dataset: Dataset, size: int, crop: int, *, workers: int,
                    batch_size: int = 256) -> tuple[torch.Tensor, list[int], dict[str, str]]:
    """Every image of ``dataset`` that decodes, resized (shorter side ``size``) and centre-cropped
    to ``crop``, as one (N, 3, crop, crop) uint8 tensor, with its labels and the files that
    failed to decode (left out); decoded once, in ``workers`` processes."""
    store = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(crop), transforms.PILToTensor()])
    loader = SkippingDataLoader(_with_transform(dataset, store), batch_size=batch_size, shuffle=False,
                                num_workers=workers)
    batches = list(loader)
    images = torch.cat([images for images, _ in batches]) if batches else torch.empty(0, 3, crop, crop, dtype=torch.uint8)
    return images, [label for _, labels in batches for label in labels.tolist()], loader.skipped


def decode_all(dataset: Dataset, size: int, crop: int, *, workers: int, batch_size: int = 256) -> torch.Tensor:
    """The images of :func:`decode_labelled` alone."""
    return decode_labelled(dataset, size, crop, workers=workers, batch_size=batch_size)[0]


@dataclass(frozen=True)
class DeviceAugmentation:
    """``Augmentation`` (random resized crop, rotation, flip, colour jitter) for a batch of
    uint8 images on any device, with per-image random parameters."""

    augmentation: Augmentation
    preprocessing: Preprocessing

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, R, R) uint8 -> (B, 3, S, S) float32, augmented and normalised."""
        aug, size = self.augmentation, self.preprocessing.input_size
        batch, device = len(images), images.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, device=device, generator=generator)

        # Random resized crop: area fraction as torchvision draws it, then an aspect ratio from
        # the part of torchvision's range where the crop fits in the image (torchvision draws
        # from the whole range and retries the crops that do not fit).
        area = uniform(aug.scale_min, 1.0)
        low = torch.clamp(torch.log(area), min=math.log(RATIO_RANGE[0]))
        high = torch.clamp(-torch.log(area), max=math.log(RATIO_RANGE[1]))
        ratio = torch.exp(low + (high - low) * torch.rand(batch, device=device, generator=generator))
        width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        centre_x = (1 - width) * (2 * uniform(0.0, 1.0) - 1)  # in [-1, 1] coordinates: the crop stays inside
        centre_y = (1 - height) * (2 * uniform(0.0, 1.0) - 1)
        angle = uniform(-aug.rotation, aug.rotation) * (math.pi / 180)
        flip = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0) if aug.hflip \
            else torch.ones(batch, device=device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([width * cos * flip, -height * sin, centre_x], 1),
                             torch.stack([width * sin * flip, height * cos, centre_y], 1)], 1)
        grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
        # "border": a crop touching the image edge must not blend in black (rotated corners then
        # repeat the edge pixels, where torchvision's RandomRotation fills black)
        pixels = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if aug.color_jitter > 0:
            pixels = _colour_jitter(pixels, aug.color_jitter, uniform)
        return _normalise(pixels, self.preprocessing)


def _colour_jitter(pixels: torch.Tensor, strength: float, uniform: Any) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - strength, 1 + strength], per image
    (torchvision's ColorJitter formulas, in a fixed order)."""
    def factor() -> torch.Tensor:
        return uniform(max(0.0, 1 - strength), 1 + strength).view(-1, 1, 1, 1)

    weights = torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)
    pixels = (pixels * factor()).clamp(0, 1)
    grey_mean = (pixels * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    pixels = ((pixels - grey_mean) * factor() + grey_mean).clamp(0, 1)
    grey = (pixels * weights).sum(1, keepdim=True)
    return ((pixels - grey) * factor() + grey).clamp(0, 1)


def _normalise(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """torchvision's ``Normalize`` (it takes a batch as it takes one image)."""
    return transforms.functional.normalize(pixels, list(pre.mean), list(pre.std))


class DeviceLoader:
    """Batches of (images, labels) from tensors on the device: shuffled or class-balanced and
    augmented (training), or in order and only normalised (evaluation). Under torchrun each
    rank holds every image and takes its shard of each epoch's order (``rank``/``world_size``,
    see ``compress.distributed.shard``): training shards padded to equal lengths, evaluation
    shards disjoint."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], preprocessing: Preprocessing, *, batch_size: int,
                 augmentation: DeviceAugmentation | None = None, shuffle: bool = False,
                 sample_weights: torch.Tensor | None = None, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long, device=images.device)
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.shuffle = shuffle
        self.sample_weights = sample_weights
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.order_generator = torch.Generator()
        self.skipped: dict[str, str] = {}  # files that failed to decode (left out when the images were stored)
        self.augment_generator = torch.Generator(device=images.device)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random order and augmentation draws (each training stage starts from
        the seed, as DataLoaders made afresh do, so a resumed run draws what a straight one does)."""
        self.order_generator.manual_seed(seed)  # the same order on every rank: each takes its shard
        self.augment_generator.manual_seed(seed + 1_000_003 * self.rank)  # other draws on every rank

    @property
    def _training(self) -> bool:
        return self.shuffle or self.sample_weights is not None

    def __len__(self) -> int:
        count = len(self.labels)
        if self.world_size > 1:
            count = math.ceil(count / self.world_size) if self._training else len(range(self.rank, count, self.world_size))
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def _order(self) -> torch.Tensor:
        count = len(self.labels)
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights.double(), count, replacement=True, generator=self.order_generator)
        elif self.shuffle:
            order = torch.randperm(count, generator=self.order_generator)
        else:
            order = torch.arange(count)
        if self.world_size > 1:
            order = shard(order, self.rank, self.world_size, pad=self._training)
        return order.to(self.images.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            images = self.images[index]
            if self.augmentation is not None:
                yield self.augmentation(images, self.augment_generator), self.labels[index]
            else:
                yield _normalise(images.float() / 255.0, self.preprocessing), self.labels[index]


def device_loaders(bundle: DataBundle, augmentation: Augmentation, device: torch.device, *, batch_size: int,
                   balance: str, seed: int, workers: int, rank: int = 0,
                   world_size: int = 1) -> tuple[DeviceLoader, DeviceLoader]:
    """The train and val loaders of ``bundle`` with the images decoded once onto ``device``;
    same batching and sharding rules as ``data.make_loaders``."""
    pre = bundle.preprocessing
    train_images, train_labels, train_skipped = decode_labelled(bundle.train, pre.resize, pre.resize, workers=workers)
    val_images, val_labels, val_skipped = decode_labelled(bundle.val, pre.resize, pre.input_size, workers=workers)
    weights = None
    if balance == "sampler":  # as data.balanced_sample_weights, over the images that decoded
        weights = class_weights(train_labels, len(bundle.classes))[torch.tensor(train_labels)]
    train = DeviceLoader(train_images.to(device), train_labels, pre, batch_size=batch_size,
                         augmentation=DeviceAugmentation(augmentation, pre), shuffle=True, sample_weights=weights,
                         drop_last=math.ceil(len(train_labels) / world_size) > batch_size, seed=seed,
                         rank=rank, world_size=world_size)
    val = DeviceLoader(val_images.to(device), val_labels, pre, batch_size=max(batch_size, 256), rank=rank,
                       world_size=world_size)
    train.skipped, val.skipped = train_skipped, val_skipped
    return train, val

"""Data as torch sees it: the datasets, augmentation, class balance and loaders of a run, built
on the torch-free :mod:`compress.data_index` (layout, classes, scan, split, preprocessing).

Unreadable or non-image files are skipped and reported (``skipped_files``), never a crash:
those the scan finds, and those that only fail when decoded for training or evaluation
(:class:`DecodeFailure`; the batch goes on without them and :class:`SkippingDataLoader` keeps
the list)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, default_collate
from torchvision import datasets, transforms

from .data_index import (DIGITS, IMAGENET_MEAN, IMAGENET_STD, SCAN_RECORD, DataIndex, Preprocessing,  # noqa: F401
                         choose_preprocessing, index_data)
from .imaging import open_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every knob is a config option (``aug_*``)."""

    scale_min: float = 0.6
    hflip: bool = True
    rotation: float = 10.0
    color_jitter: float = 0.2

    def train_transform(self, pre: Preprocessing) -> Callable:
        steps: list[Callable] = [transforms.Resize(pre.resize)]
        if self.rotation > 0:
            steps.append(transforms.RandomRotation(self.rotation))
        steps.append(transforms.RandomResizedCrop(pre.input_size, scale=(self.scale_min, 1.0), antialias=True))
        if self.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(transforms.ColorJitter(brightness=j, contrast=j, saturation=j))
        steps += [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]
        return transforms.Compose(steps)


@dataclass(kw_only=True)
class DataBundle(DataIndex):
    """A run's data: its :class:`DataIndex` and the train/val datasets built on it."""

    train: Dataset
    val: Dataset


class DecodeFailure(NamedTuple):
    """What a dataset returns instead of an image that passed the scan but fails to decode:
    the batch goes on without it (see :func:`collate_decoded`)."""

    path: str
    reason: str


class ScannedImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder made from a scan's sample list (no second walk of the folder),
    decoding any image mode to RGB; a file that fails to decode comes back as a
    :class:`DecodeFailure` instead of an exception that would end the epoch.

    ``draft`` (training only): JPEGs may decode at a reduced scale with both sides at least
    this long (``imaging.open_rgb``), since the training transforms start by resizing there."""

    def __init__(self, root: Path, classes: Sequence[str], samples: list[tuple[str, int]],
                 transform: Callable | None = None, draft: int | None = None) -> None:
        datasets.VisionDataset.__init__(self, str(root), transform=transform)
        self.loader = open_rgb
        self.extensions = None
        self.classes = list(classes)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = samples
        self.imgs = samples
        self.targets = [target for _, target in samples]
        self.draft = draft

    def __getitem__(self, index: int) -> tuple[Any, int] | DecodeFailure:
        path, target = self.samples[index]
        try:
            image = open_rgb(path, draft_min_side=self.draft)
        except Exception as exc:  # any decoder error: skip this file, not the epoch
            text = str(exc).strip()
            return DecodeFailure(path, (text.splitlines()[0] if text else type(exc).__name__)[:200])
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_decoded(samples: list[Any]) -> tuple[Any, list[DecodeFailure]]:
    """``default_collate`` of the samples that decoded, and the failures apart (``None`` for
    the batch when none decoded)."""
    failed = [s for s in samples if isinstance(s, DecodeFailure)]
    good = [s for s in samples if not isinstance(s, DecodeFailure)] if failed else samples
    return (default_collate(good) if good else None), failed


class SkippingDataLoader(DataLoader):
    """A DataLoader whose batches leave out files that fail to decode; ``skipped`` maps each
    such file (absolute path) to the reason, gathered from every worker process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("collate_fn", collate_decoded)
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}

    def __iter__(self) -> Any:
        for batch, failed in super().__iter__():
            for failure in failed:
                self.skipped[failure.path] = failure.reason
            if batch is not None:
                yield batch


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 arrays (the embedded digits set)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable) -> None:
        self.images = images
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index], mode="RGB")), self.labels[index]


def load_data(
    data: str,
    *,
    augment: Augmentation,
    val_fraction: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    min_images_per_class: int = 2,
    scan_record: Path | None = None,
    normalisation: dict[str, tuple[float, float, float]] | None = None,
    class_order: list[str] | None = None,
) -> DataBundle:
    """Resolve ``--data`` into train/val datasets (see :func:`data_index.index_data` for the
    layouts, the split and ``scan_record``), or raise ``UsageError`` saying why not."""
    index = index_data(data, val_fraction=val_fraction, seed=seed, input_size=input_size,
                       min_images_per_class=min_images_per_class, scan_record=scan_record,
                       normalisation=normalisation, class_order=class_order)
    pre = index.preprocessing
    train_transform, eval_transform = augment.train_transform(pre), pre.eval_transform()
    if index.arrays is not None:
        train: Dataset = ArrayImageDataset(index.arrays[0], index.train_labels, train_transform)
        val: Dataset = ArrayImageDataset(index.arrays[1], index.val_labels, eval_transform)
    else:
        assert index.train_root is not None and index.val_root is not None
        train = ScannedImageFolder(index.train_root, index.classes, index.train_samples, train_transform,
                                   draft=pre.resize)
        val = ScannedImageFolder(index.val_root, index.classes, index.val_samples, eval_transform)
    return DataBundle(**{f.name: getattr(index, f.name) for f in dataclasses.fields(DataIndex)}, train=train, val=val)


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced set gets 1.0 for every class."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sample_weights(bundle: DataBundle) -> torch.Tensor:
    """One weight per training image (its class's inverse frequency): drawing by these
    weights (``--balance sampler``) visits every class equally often."""
    return class_weights(bundle.train_labels, len(bundle.classes))[torch.tensor(bundle.train_labels)]


def make_loaders(bundle: DataBundle, *, batch_size: int, balance: str, seed: int, workers: int,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, or a class-balanced sampler for ``balance='sampler'``) and an
    ordered val loader. With ``world_size`` > 1 (torchrun), rank ``rank``'s shards of both."""
    generator = torch.Generator().manual_seed(seed + rank)
    sampler = val_sampler = None
    weights = balanced_sample_weights(bundle) if balance == "sampler" else None
    if world_size > 1:
        from .distributed import shard_samplers

        sampler, val_sampler = shard_samplers(len(bundle.train_labels), len(bundle.val_labels), rank=rank,
                                              world_size=world_size, seed=seed, weights=weights)
    elif weights is not None:
        sampler = WeightedRandomSampler(weights.double(), num_samples=len(weights), replacement=True, generator=generator)
    train_count = len(sampler) if world_size > 1 else len(bundle.train_labels)
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    train = SkippingDataLoader(bundle.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                               generator=generator, drop_last=train_count > batch_size, **common)
    val = SkippingDataLoader(bundle.val, batch_size=max(batch_size, 256), shuffle=False, sampler=val_sampler, **common)
    return train, val

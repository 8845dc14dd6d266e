"""Data: find the image folder's layout, decode every image to RGB, split, augment, balance.

Layouts accepted by ``--data``:
- ``PATH/train/<class>/*`` with ``PATH/val/<class>/*`` (or ``PATH/test/<class>/*``);
- ``PATH/<class>/*``: one folder, split into train/val stratified by class and seeded;
- ``digits``: scikit-learn's 8x8 handwritten digits, upscaled, embedded so that the whole
  pipeline runs offline on a fresh machine.

Unreadable or non-image files are skipped and reported (``skipped_files``), never a crash."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler
from torchvision import datasets, transforms

from .errors import UsageError
from .imaging import open_rgb

DIGITS = "digits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_SPLIT_NAMES = ("val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Preprocessing:
    """What a served image goes through: resize the shorter side to ``resize``, centre-crop
    ``input_size``, scale to [0, 1], normalise. Stored in the manifest and the ONNX metadata."""

    input_size: int
    resize: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std), "interpolation": "bilinear", "layout": "NCHW", "color": "RGB"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(int(data["input_size"]), int(data["resize"]), tuple(data["mean"]), tuple(data["std"]))

    def eval_transform(self) -> Callable:
        return transforms.Compose([
            transforms.Resize(self.resize),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


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


@dataclass
class DataBundle:
    """The train/val datasets of a run plus what the manifest records about them."""

    classes: list[str]
    train: Dataset
    val: Dataset
    train_labels: list[int]
    val_labels: list[int]
    preprocessing: Preprocessing
    source: str
    layout: str
    skipped_files: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        train_counts = Counter(self.train_labels)
        val_counts = Counter(self.val_labels)
        return {
            "source": self.source,
            "layout": self.layout,
            "classes": self.classes,
            "train": len(self.train_labels),
            "val": len(self.val_labels),
            "class_counts": {
                "train": {c: train_counts.get(i, 0) for i, c in enumerate(self.classes)},
                "val": {c: val_counts.get(i, 0) for i, c in enumerate(self.classes)},
            },
            "skipped_files": self.skipped_files,
            "input_size": self.preprocessing.input_size,
        }


class _ValidatingLoader:
    """Decode each file once at scan time (so a corrupt file is found before training, not in
    a DataLoader worker mid-epoch) and remember which files were skipped and why."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped: dict[str, str] = {}
        self.sizes: list[tuple[int, int]] = []

    def is_valid_file(self, path: str) -> bool:
        if os.path.basename(path).startswith("."):
            return False
        try:
            image = open_rgb(path)
        except Exception as exc:  # any decoder error means "not a usable image"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.skipped[os.path.relpath(path, self.root)] = reason[:200]
            return False
        if len(self.sizes) < 2000:
            self.sizes.append(image.size)
        return True

    def skipped_list(self) -> list[dict[str, str]]:
        return [{"path": p, "reason": r} for p, r in sorted(self.skipped.items())]


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


def choose_preprocessing(sizes: Sequence[tuple[int, int]], input_size: int | None) -> Preprocessing:
    """Small images (CIFAR-like, <= 64 px) are trained at 32 px, larger ones at ImageNet's
    224 px with the usual 256 -> 224 centre crop; ``--input-size`` overrides."""
    if input_size is None:
        median_side = float(np.median([min(w, h) for w, h in sizes])) if sizes else 224.0
        input_size = 32 if median_side <= 64 else 224
    if input_size < 16:
        raise UsageError(f"--input-size {input_size} is too small (minimum 16)")
    resize = input_size if input_size <= 64 else round(input_size * 256 / 224)
    return Preprocessing(input_size=input_size, resize=resize)


def _stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                              stratify=np.asarray(labels))
    except ValueError as exc:
        raise UsageError(f"cannot split the data into train/val: {exc}") from None
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def _check_counts(classes: Sequence[str], labels: Sequence[int], split: str, minimum: int) -> None:
    counts = Counter(labels)
    for index, name in enumerate(classes):
        if counts.get(index, 0) < minimum:
            raise UsageError(
                f"class '{name}' has {counts.get(index, 0)} readable image(s) in {split}; at least {minimum} needed")


def _load_digits(augment: Augmentation, val_fraction: float, seed: int, input_size: int | None) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (N, 8, 8), values 0..16
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels = digits.target.tolist()
    classes = [str(c) for c in range(10)]
    pre = choose_preprocessing([(8, 8)], input_size)
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    train = ArrayImageDataset(rgb[train_idx], [labels[i] for i in train_idx], augment.train_transform(pre))
    val = ArrayImageDataset(rgb[val_idx], [labels[i] for i in val_idx], pre.eval_transform())
    return DataBundle(classes, train, val, train.labels, val.labels, pre, DIGITS, "embedded")


def _image_folder(root: Path, checker: _ValidatingLoader, transform: Callable | None = None) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(root), transform=transform, loader=open_rgb,
                                    is_valid_file=checker.is_valid_file, allow_empty=True)
    except FileNotFoundError as exc:
        raise UsageError(f"no class folders in {root}: {exc}") from None


def load_data(
    data: str,
    *,
    augment: Augmentation,
    val_fraction: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    min_images_per_class: int = 2,
) -> DataBundle:
    """Resolve ``--data`` into train/val datasets, or raise :class:`UsageError` saying why not."""
    if data == DIGITS:
        return _load_digits(augment, val_fraction, seed, input_size)
    root = Path(data).expanduser()
    if not root.exists():
        raise UsageError(f"--data {data}: no such folder")
    if not root.is_dir():
        raise UsageError(f"--data {data}: not a folder (expected PATH/<class>/* or PATH/train + PATH/val)")
    checker = _ValidatingLoader(root)
    if (root / "train").is_dir():
        val_root = next((root / n for n in VAL_SPLIT_NAMES if (root / n).is_dir()), None)
        if val_root is None:
            raise UsageError(f"{root} has train/ but no val/ or test/ folder next to it")
        train_scan = _image_folder(root / "train", checker)
        val_scan = _image_folder(val_root, checker)
        if not train_scan.classes:
            raise UsageError(f"no class folders in {root / 'train'}")
        if train_scan.classes != val_scan.classes:
            missing = sorted(set(train_scan.classes) ^ set(val_scan.classes))
            raise UsageError(f"train/ and {val_root.name}/ have different class folders (differ in: {', '.join(missing)})")
        _check_counts(train_scan.classes, train_scan.targets, "train", max(1, min_images_per_class - 1))
        _check_counts(val_scan.classes, val_scan.targets, val_root.name, 1)
        pre = choose_preprocessing(checker.sizes, input_size)
        # Reuse the scanned sample lists: no second pass over the files.
        train_scan.transform = augment.train_transform(pre)
        val_scan.transform = pre.eval_transform()
        return DataBundle(train_scan.classes, train_scan, val_scan, list(train_scan.targets), list(val_scan.targets),
                          pre, str(root), f"train+{val_root.name}", checker.skipped_list())
    scan = _image_folder(root, checker)
    if not scan.classes:
        raise UsageError(f"no class folders in {root} (expected PATH/<class>/* or PATH/train + PATH/val)")
    if len(scan.classes) < 2:
        raise UsageError(f"{root} has only one class folder ('{scan.classes[0]}'); a classifier needs at least 2")
    _check_counts(scan.classes, scan.targets, str(root), min_images_per_class)
    pre = choose_preprocessing(checker.sizes, input_size)
    train_idx, val_idx = _stratified_split(scan.targets, val_fraction, seed)
    train_view = datasets.ImageFolder.__new__(datasets.ImageFolder)
    train_view.__dict__.update(scan.__dict__)
    train_view.transform = augment.train_transform(pre)
    scan.transform = pre.eval_transform()
    train, val = Subset(train_view, train_idx), Subset(scan, val_idx)
    return DataBundle(scan.classes, train, val, [scan.targets[i] for i in train_idx],
                      [scan.targets[i] for i in val_idx], pre, str(root), "split", checker.skipped_list())


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
    train = DataLoader(bundle.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       generator=generator, drop_last=train_count > batch_size, **common)
    val = DataLoader(bundle.val, batch_size=max(batch_size, 256), shuffle=False, sampler=val_sampler, **common)
    return train, val

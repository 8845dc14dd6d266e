"""Data: find the image folder's layout, scan it (headers only, see ``scan``), split, augment, balance.

Layouts accepted by ``--data``:
- ``PATH/train/<class>/*`` with ``PATH/val/<class>/*`` (or ``PATH/test/<class>/*``);
- ``PATH/<class>/*``: one folder, split into train/val stratified by class and seeded;
- ``digits``: scikit-learn's 8x8 handwritten digits, upscaled, embedded so that the whole
  pipeline runs offline on a fresh machine.

Unreadable or non-image files are skipped and reported (``skipped_files``), never a crash:
those the scan finds, and those that only fail when decoded for training or evaluation
(:class:`DecodeFailure`; the batch goes on without them and :class:`SkippingDataLoader` keeps
the list)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler, default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes

from .errors import UsageError
from .imaging import open_rgb
from .scan import ScanRecord, scan

DIGITS = "digits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_SPLIT_NAMES = ("val", "test")
SCAN_RECORD = "data_scan.json.gz"  # in the run directory: the scan, so that reopening reads no image
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
    scan: ScanRecord | None = None

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
            **({"scan": {**self.scan.stats, "record": SCAN_RECORD}} if self.scan is not None else {}),
        }


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


def _find_classes(folder: Path) -> list[str]:
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError:
        return []


def _scan_folder(root: Path, splits: dict[str, Path], classes: list[str], record_path: Path | None) -> ScanRecord:
    """Scan the class folders of every split, reusing the record at ``record_path`` (a run's
    earlier scan) for the files that have not changed since."""
    previous = ScanRecord.load(record_path) if record_path is not None and record_path.is_file() else None
    if previous is not None and previous.root != str(root):
        previous = None  # another folder: nothing to reuse
    return scan(root, [folder / name for folder in splits.values() for name in classes], previous)


def _samples(root: Path, record: ScanRecord, classes: list[str], split_prefix: str) -> list[tuple[str, int]]:
    """(absolute path, label) of the readable files of one split, in ImageFolder's order."""
    index = {name: i for i, name in enumerate(classes)}
    base = os.path.join(str(root), "")
    prefix = f"{split_prefix}/" if split_prefix else ""
    return [(base + path, index[path[len(prefix):].split("/", 1)[0]])
            for path in record.headers if path.startswith(prefix)]


def load_data(
    data: str,
    *,
    augment: Augmentation,
    val_fraction: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    min_images_per_class: int = 2,
    scan_record: Path | None = None,
) -> DataBundle:
    """Resolve ``--data`` into train/val datasets, or raise :class:`UsageError` saying why not.

    ``scan_record``: a run's stored scan (``SCAN_RECORD``); what it knows about unchanged files
    is reused. The bundle's ``scan`` is the (new or reused) record, for the caller to store."""
    if data == DIGITS:
        return _load_digits(augment, val_fraction, seed, input_size)
    root = Path(data).expanduser()
    if not root.exists():
        raise UsageError(f"--data {data}: no such folder")
    if not root.is_dir():
        raise UsageError(f"--data {data}: not a folder (expected PATH/<class>/* or PATH/train + PATH/val)")
    root = root.resolve()
    if (root / "train").is_dir():
        val_root = next((root / n for n in VAL_SPLIT_NAMES if (root / n).is_dir()), None)
        if val_root is None:
            raise UsageError(f"{root} has train/ but no val/ or test/ folder next to it")
        classes, val_classes = _find_classes(root / "train"), _find_classes(val_root)
        if not classes:
            raise UsageError(f"no class folders in {root / 'train'}")
        if classes != val_classes:
            missing = sorted(set(classes) ^ set(val_classes))
            raise UsageError(f"train/ and {val_root.name}/ have different class folders (differ in: {', '.join(missing)})")
        record = _scan_folder(root, {"train": root / "train", "val": val_root}, classes, scan_record)
        train_samples = _samples(root, record, classes, "train")
        val_samples = _samples(root, record, classes, val_root.name)
        train_labels, val_labels = [t for _, t in train_samples], [t for _, t in val_samples]
        _check_counts(classes, train_labels, "train", max(1, min_images_per_class - 1))
        _check_counts(classes, val_labels, val_root.name, 1)
        pre = choose_preprocessing(record.sizes(), input_size)
        train = ScannedImageFolder(root / "train", classes, train_samples, augment.train_transform(pre), draft=pre.resize)
        val = ScannedImageFolder(val_root, classes, val_samples, pre.eval_transform())
        return DataBundle(classes, train, val, train_labels, val_labels, pre, str(root), f"train+{val_root.name}",
                          record.skipped_list(), record)
    classes = _find_classes(root)
    if not classes:
        raise UsageError(f"no class folders in {root} (expected PATH/<class>/* or PATH/train + PATH/val)")
    if len(classes) < 2:
        raise UsageError(f"{root} has only one class folder ('{classes[0]}'); a classifier needs at least 2")
    record = _scan_folder(root, {"all": root}, classes, scan_record)
    samples = _samples(root, record, classes, "")
    labels = [t for _, t in samples]
    _check_counts(classes, labels, str(root), min_images_per_class)
    pre = choose_preprocessing(record.sizes(), input_size)
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    train_view = ScannedImageFolder(root, classes, samples, augment.train_transform(pre), draft=pre.resize)
    val_view = ScannedImageFolder(root, classes, samples, pre.eval_transform())
    train, val = Subset(train_view, train_idx), Subset(val_view, val_idx)
    return DataBundle(classes, train, val, [labels[i] for i in train_idx], [labels[i] for i in val_idx], pre,
                      str(root), "split", record.skipped_list(), record)


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

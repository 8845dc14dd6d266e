"""What ``--data`` holds, without torch: the layout, the classes, the readable files of each
split (from the header scan, see ``scan``), the seeded stratified split and the preprocessing a
run would choose.

``compress data PATH`` needs no more than this, so it imports PIL and numpy only and starts in
well under a second; ``data.load_data`` builds the torch datasets on top of it.

Layouts accepted by ``--data``:
- ``PATH/train/<class>/*`` with ``PATH/val/<class>/*`` (or ``PATH/test/<class>/*``);
- ``PATH/<class>/*``: one folder, split into train/val stratified by class and seeded;
- ``digits``: scikit-learn's 8x8 handwritten digits, upscaled, embedded so that the whole
  pipeline runs offline on a fresh machine."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError
from .scan import ScanRecord, scan

DIGITS = "digits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_SPLIT_NAMES = ("val", "test")
SCAN_RECORD = "data_scan.json.gz"  # in the run directory: the scan, so that reopening reads no image


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
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.resize),
            transforms.CenterCrop(self.input_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


@dataclass(kw_only=True)
class DataIndex:
    """A data set's classes, labels and files per split, and what the manifest records about
    it. ``train_samples``/``val_samples`` are (absolute path, label) of the readable files
    (empty for the embedded digits, whose pixels are in ``arrays``)."""

    classes: list[str]
    train_labels: list[int]
    val_labels: list[int]
    preprocessing: Preprocessing
    source: str
    layout: str
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    scan: ScanRecord | None = None
    train_root: Path | None = None
    val_root: Path | None = None
    train_samples: list[tuple[str, int]] = field(default_factory=list)
    val_samples: list[tuple[str, int]] = field(default_factory=list)
    arrays: tuple[np.ndarray, np.ndarray] | None = None  # digits: (train, val) uint8 RGB images

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


def choose_preprocessing(sizes: Sequence[tuple[int, int]], input_size: int | None,
                         normalisation: dict[str, tuple[float, float, float]] | None = None) -> Preprocessing:
    """Small images (CIFAR-like, <= 64 px) are trained at 32 px, larger ones at ImageNet's
    224 px with the usual 256 -> 224 centre crop; ``--input-size`` overrides. ``normalisation``:
    ``--mean``/``--std`` of a model trained elsewhere (default ImageNet's)."""
    if input_size is None:
        median_side = float(np.median([min(w, h) for w, h in sizes])) if sizes else 224.0
        input_size = 32 if median_side <= 64 else 224
    if input_size < 16:
        raise UsageError(f"--input-size {input_size} is too small (minimum 16)")
    resize = input_size if input_size <= 64 else round(input_size * 256 / 224)
    return Preprocessing(input_size=input_size, resize=resize, **(normalisation or {}))


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of each class ``n_draws`` draws take, proportionally, remainders broken at
    random: scikit-learn's ``utils.extmath._approximate_mode``, step for step."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (indices,) = np.where(remainder == value)
            add_now = min(len(indices), need_to_add)
            floored[rng.choice(indices, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices of a seeded split stratified by label.

    The same indices as scikit-learn's ``train_test_split(..., test_size=val_fraction,
    random_state=seed, stratify=labels)`` (the split runs made before, so resuming them keeps
    their validation images; ``tests/test_data.py`` compares the two), without importing
    scikit-learn (a second of start-up) and without depending on its version."""
    y = np.asarray(labels)
    n_samples = len(y)
    n_val = math.ceil(val_fraction * n_samples)
    n_train = math.floor((1.0 - val_fraction) * n_samples)
    classes, y_indices = np.unique(y, return_inverse=True)
    class_counts = np.bincount(y_indices)
    if n_samples == 0 or n_train == 0 or n_val == 0:
        raise UsageError(f"cannot split the data into train/val: {n_samples} images with --val-fraction {val_fraction}")
    if class_counts.min() < 2:
        raise UsageError("cannot split the data into train/val: the least populated class has only 1 member "
                         "(at least 2 needed)")
    if n_train < len(classes) or n_val < len(classes):
        raise UsageError(f"cannot split the data into train/val: {n_train} train / {n_val} val images for "
                         f"{len(classes)} classes (each split needs one per class)")
    class_indices = np.split(np.argsort(y_indices, kind="mergesort"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    train_per_class = _approximate_mode(class_counts, n_train, rng)
    val_per_class = _approximate_mode(class_counts - train_per_class, n_val, rng)
    train: list[int] = []
    val: list[int] = []
    for i in range(len(classes)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: train_per_class[i]].tolist())
        val.extend(members[train_per_class[i]: train_per_class[i] + val_per_class[i]].tolist())
    return sorted(train), sorted(val)


def _check_counts(classes: Sequence[str], labels: Sequence[int], split: str, minimum: int) -> None:
    counts = Counter(labels)
    for index, name in enumerate(classes):
        if counts.get(index, 0) < minimum:
            raise UsageError(
                f"class '{name}' has {counts.get(index, 0)} readable image(s) in {split}; at least {minimum} needed")


def find_classes(folder: Path) -> list[str]:
    """The class folders' names, sorted (torchvision ImageFolder's order and rule)."""
    try:
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
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


DIGIT_CLASSES = [str(c) for c in range(10)]


def ordered_classes(found: list[str], class_order: list[str] | None, where: str) -> list[str]:
    """The class folders' names in the model's order: sorted (ImageFolder's rule), or the
    order of ``--classes FILE``, which must name exactly the same classes."""
    if class_order is None:
        return found
    if set(class_order) != set(found):
        differ = sorted(set(class_order) ^ set(found))
        raise UsageError(f"--classes names other classes than {where} has (differ in: {', '.join(differ[:5])})")
    return list(class_order)


def class_names(data: str, class_order: list[str] | None = None) -> list[str]:
    """The classes a run on ``--data`` will have, from the folder names alone (no scan), so a
    model whose head does not fit is refused before any image is read; empty when the folder
    is not usable (``index_data`` then says why)."""
    if data == DIGITS:
        return ordered_classes(DIGIT_CLASSES, class_order, "digits")
    root = Path(data).expanduser()
    folder = root / "train" if (root / "train").is_dir() else root
    found = find_classes(folder) if root.is_dir() else []
    return ordered_classes(found, class_order, str(folder)) if found else []


def _index_digits(val_fraction: float, seed: int, input_size: int | None,
                  normalisation: dict[str, tuple[float, float, float]] | None,
                  class_order: list[str] | None) -> DataIndex:
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (N, 8, 8), values 0..16
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    classes = ordered_classes(DIGIT_CLASSES, class_order, "digits")
    labels = [classes.index(str(d)) for d in digits.target.tolist()]
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return DataIndex(classes=classes, train_labels=[labels[i] for i in train_idx],
                     val_labels=[labels[i] for i in val_idx],
                     preprocessing=choose_preprocessing([(8, 8)], input_size, normalisation),
                     source=DIGITS, layout="embedded", arrays=(rgb[train_idx], rgb[val_idx]))


def index_data(
    data: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    min_images_per_class: int = 2,
    scan_record: Path | None = None,
    normalisation: dict[str, tuple[float, float, float]] | None = None,
    class_order: list[str] | None = None,
) -> DataIndex:
    """Resolve ``--data`` into its classes and splits, or raise :class:`UsageError` saying why not.

    ``scan_record``: a run's stored scan (``SCAN_RECORD``); what it knows about unchanged files
    is reused. The index's ``scan`` is the (new or reused) record, for the caller to store.
    ``normalisation`` (``--mean``/``--std``) and ``class_order`` (``--classes``): how a model
    trained elsewhere expects its inputs and orders its outputs."""
    if data == DIGITS:
        return _index_digits(val_fraction, seed, input_size, normalisation, class_order)
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
        classes, val_classes = find_classes(root / "train"), find_classes(val_root)
        if not classes:
            raise UsageError(f"no class folders in {root / 'train'}")
        if classes != val_classes:
            missing = sorted(set(classes) ^ set(val_classes))
            raise UsageError(f"train/ and {val_root.name}/ have different class folders (differ in: {', '.join(missing)})")
        classes = ordered_classes(classes, class_order, str(root / "train"))
        record = _scan_folder(root, {"train": root / "train", "val": val_root}, classes, scan_record)
        train_samples = _samples(root, record, classes, "train")
        val_samples = _samples(root, record, classes, val_root.name)
        train_labels, val_labels = [t for _, t in train_samples], [t for _, t in val_samples]
        _check_counts(classes, train_labels, "train", max(1, min_images_per_class - 1))
        _check_counts(classes, val_labels, val_root.name, 1)
        return DataIndex(classes=classes, train_labels=train_labels, val_labels=val_labels,
                         preprocessing=choose_preprocessing(record.sizes(), input_size, normalisation), source=str(root),
                         layout=f"train+{val_root.name}", skipped_files=record.skipped_list(), scan=record,
                         train_root=root / "train", val_root=val_root, train_samples=train_samples,
                         val_samples=val_samples)
    classes = find_classes(root)
    if not classes:
        raise UsageError(f"no class folders in {root} (expected PATH/<class>/* or PATH/train + PATH/val)")
    if len(classes) < 2:
        raise UsageError(f"{root} has only one class folder ('{classes[0]}'); a classifier needs at least 2")
    classes = ordered_classes(classes, class_order, str(root))
    record = _scan_folder(root, {"all": root}, classes, scan_record)
    samples = _samples(root, record, classes, "")
    labels = [t for _, t in samples]
    _check_counts(classes, labels, str(root), min_images_per_class)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return DataIndex(classes=classes, train_labels=[labels[i] for i in train_idx],
                     val_labels=[labels[i] for i in val_idx],
                     preprocessing=choose_preprocessing(record.sizes(), input_size, normalisation), source=str(root), layout="split",
                     skipped_files=record.skipped_list(), scan=record, train_root=root, val_root=root,
                     train_samples=[samples[i] for i in train_idx], val_samples=[samples[i] for i in val_idx])

"""Data edge cases, on real image files written to a temporary folder."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import Augmentation, class_weights, load_data, make_loaders
from compress.errors import UsageError
from compress.imaging import open_rgb, to_rgb

from conftest import make_image_folder, make_split_folder

AUG = Augmentation(hflip=False)


def test_corrupt_and_non_image_files_are_skipped_and_listed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=6)
    (root / "cat" / "notes.jpg").write_text("this is not an image")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "owl" / "empty.png").write_bytes(b"")
    bundle = load_data(str(root), augment=AUG, seed=0)
    skipped = {entry["path"] for entry in bundle.skipped_files}
    assert skipped == {"cat/notes.jpg", "dog/truncated.png", "owl/empty.png"}
    assert all(entry["reason"] for entry in bundle.skipped_files)
    assert bundle.summary()["train"] + bundle.summary()["val"] == 18
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 3


def _save_mode(path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(path)
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path.with_suffix(".jpg"))
    else:
        rgb.convert(mode).save(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb_in_training(tmp_path: Path, mode: str) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4)
    _save_mode(root / "cat" / f"odd_{mode.replace(';', '_')}.png", mode)
    bundle = load_data(str(root), augment=AUG, seed=0)
    assert bundle.skipped_files == []
    for dataset in (bundle.train, bundle.val):
        for index in range(len(dataset)):
            assert dataset[index][0].shape == (3, 32, 32)


def test_sixteen_bit_grey_is_rescaled_not_clipped() -> None:
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(array))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255]


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    Image.new("L", (400, 400)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="over the limit"):
        open_rgb(tmp_path / "big.png", max_pixels=10_000)


def test_single_folder_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=10)
    first = load_data(str(root), augment=AUG, seed=3)
    again = load_data(str(root), augment=AUG, seed=3)
    other = load_data(str(root), augment=AUG, seed=4)
    assert first.layout == "split"
    assert first.val_labels == again.val_labels and first.val.indices == again.val.indices
    assert first.val.indices != other.val.indices
    assert Counter(first.val_labels) == {0: 2, 1: 2, 2: 2}
    assert set(first.train.indices).isdisjoint(first.val.indices)


def test_train_val_layout_and_test_folder(tmp_path: Path) -> None:
    root = make_split_folder(tmp_path / "d")
    bundle = load_data(str(root), augment=AUG)
    assert (bundle.layout, bundle.summary()["train"], bundle.summary()["val"]) == ("train+val", 30, 12)
    (root / "val").rename(root / "test")
    assert load_data(str(root), augment=AUG).layout == "train+test"


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("file", "not a folder"),
    ("no_val", "no val/ or test/"),
    ("empty_class", "class 'owl' has 0 readable image"),
    ("one_image", "class 'owl' has 1 readable image"),
    ("no_classes", "no class folders"),
    ("one_class", "only one class"),
    ("mismatch", "different class folders"),
])
def test_bad_layouts_are_clear_errors(tmp_path: Path, case: str, message: str) -> None:
    root = tmp_path / "d"
    if case == "file":
        root.write_text("x")
    elif case == "no_val":
        make_image_folder(root / "train", per_class=3)
    elif case == "empty_class":
        make_image_folder(root, per_class=3)
        for file in (root / "owl").iterdir():
            file.unlink()
    elif case == "one_image":
        make_image_folder(root, per_class=3)
        for file in list((root / "owl").iterdir())[1:]:
            file.unlink()
    elif case == "no_classes":
        root.mkdir()
        (root / "loose.png").write_bytes(b"")
    elif case == "one_class":
        make_image_folder(root, per_class=3, classes={"cat": (1, 2, 3)})
    elif case == "mismatch":
        make_split_folder(root)
        (root / "val" / "owl").rename(root / "val" / "eagle")
    with pytest.raises(UsageError, match=message):
        load_data(str(root), augment=AUG)


def test_digits_is_embedded() -> None:
    bundle = load_data("digits", augment=AUG, seed=0)
    summary = bundle.summary()
    assert summary["classes"] == [str(i) for i in range(10)]
    assert summary["train"] + summary["val"] == 1797
    assert bundle.preprocessing.input_size == 32
    assert bundle.val[0][0].shape == (3, 32, 32)


def test_class_weights_and_balanced_sampler(tmp_path: Path) -> None:
    labels = [0] * 30 + [1] * 10 + [2] * 5
    weights = class_weights(labels, 3)
    assert torch.allclose(weights * torch.tensor([30.0, 10.0, 5.0]), torch.full((3,), 15.0))
    root = tmp_path / "d"
    for name, count in {"cat": 30, "dog": 10, "owl": 5}.items():
        make_image_folder(root, per_class=count, classes={name: (100, 100, 100)})
    bundle = load_data(str(root), augment=AUG, seed=0, val_fraction=0.2)
    train_loader, _ = make_loaders(bundle, batch_size=8, balance="sampler", seed=0, workers=0)
    drawn = Counter()
    for _ in range(20):
        for _, batch_labels in train_loader:
            drawn.update(batch_labels.tolist())
    total = sum(drawn.values())
    assert all(abs(drawn[c] / total - 1 / 3) < 0.08 for c in range(3)), drawn

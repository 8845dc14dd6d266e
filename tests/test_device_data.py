"""Data held as tensors on the training device (`--data-on-device`), exercised on the CPU
device: the same code runs on CUDA, where it matters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.data import Augmentation, Preprocessing, load_data
from compress.device_data import DeviceAugmentation, DeviceLoader, decode_all, device_loaders, use_device_data

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tiny_data: Path):  # type: ignore[no-untyped-def]
    return load_data(str(tiny_data), augment=Augmentation(), input_size=16, seed=0)


def test_device_val_batches_equal_the_eval_transform(bundle) -> None:  # type: ignore[no-untyped-def]
    _, val = device_loaders(bundle, Augmentation(), CPU, batch_size=8, balance="none", seed=0, workers=0)
    images, labels = zip(*(val_batch for val_batch in val))
    got = torch.cat(images)
    expected = torch.stack([bundle.val[i][0] for i in range(len(bundle.val_labels))])
    assert got.shape == expected.shape == (len(bundle.val_labels), 3, 16, 16)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.cat(labels).tolist() == bundle.val_labels


def test_augmentation_off_is_the_identity_and_flips_are_per_image() -> None:
    pre = Preprocessing(input_size=8, resize=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=generator)
    plain = (images.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)

    identity = DeviceAugmentation(Augmentation(scale_min=1.0, hflip=False, rotation=0.0, color_jitter=0.0), pre)
    assert torch.allclose(identity(images, generator), plain, atol=1e-5)

    flips = DeviceAugmentation(Augmentation(scale_min=1.0, hflip=True, rotation=0.0, color_jitter=0.0), pre)
    out = flips(images, generator)
    same = [torch.allclose(o, p, atol=1e-5) for o, p in zip(out, plain)]
    mirrored = [torch.allclose(o, p.flip(-1), atol=1e-5) for o, p in zip(out, plain)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # about half, each image its own draw


def test_full_augmentation_draws_per_image_and_keeps_shapes(bundle) -> None:  # type: ignore[no-untyped-def]
    pre = bundle.preprocessing
    augment = DeviceAugmentation(Augmentation(scale_min=0.5, hflip=True, rotation=15.0, color_jitter=0.3), pre)
    stored = decode_all(bundle.train, pre.resize, pre.resize, workers=0)
    assert stored.dtype == torch.uint8 and stored.shape == (len(bundle.train_labels), 3, pre.resize, pre.resize)
    same_image = stored[:1].repeat(16, 1, 1, 1)
    out = augment(same_image, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) == 16  # one input, sixteen different crops/rotations/colours


def test_loader_batches_shuffle_and_balance() -> None:
    pre = Preprocessing(input_size=4, resize=4)
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    for i in range(10):
        images[i] = i
    labels = [0] * 8 + [1] * 2
    loader = DeviceLoader(images, labels, pre, batch_size=4, shuffle=True, drop_last=True, seed=3)
    assert len(loader) == 2
    seen = torch.cat([batch for batch, _ in loader])
    assert seen.shape == (8, 3, 4, 4)
    weights = torch.tensor([1 / 8] * 8 + [1 / 2] * 2)
    balanced = DeviceLoader(images, labels, pre, batch_size=5, sample_weights=weights, seed=0)
    drawn = torch.cat([y for _ in range(200) for _, y in balanced])
    assert abs(drawn.float().mean().item() - 0.5) < 0.05  # the 2 minority images drawn as often as the 8 others
    ordered = DeviceLoader(images, labels, pre, batch_size=4)
    assert len(ordered) == 3 and torch.cat([y for _, y in ordered]).tolist() == labels


def test_auto_is_on_only_for_cuda(bundle) -> None:  # type: ignore[no-untyped-def]
    assert not use_device_data("auto", bundle, CPU)
    assert use_device_data("auto", bundle, torch.device("cuda"))
    assert use_device_data("on", bundle, CPU) and not use_device_data("off", bundle, torch.device("cuda"))


@pytest.mark.slow
def test_finetune_with_data_on_device(tiny_data: Path, tmp_path: Path) -> None:
    from compress.cli import main

    from conftest import TINY_OPTIONS

    out = tmp_path / "run"
    main(["finetune", "--data", str(tiny_data), "--out", str(out), *TINY_OPTIONS, "--epochs", "3",
          "--data-on-device", "on"])  # raises SystemExit on failure
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"]["finetune"]
    assert stage["data_on_device"] is True and stage["device"] == "cpu"
    assert len(stage["history"]) == 3 and all(h["train_images_per_second"] > 0 for h in stage["history"])
    # it learns from the device-augmented batches (validation after 6 steps is too noisy to test:
    # BatchNorm's running statistics have not settled)
    first, last = stage["history"][0], stage["history"][-1]
    assert last["train_loss"] < first["train_loss"] and last["train_accuracy"] > 0.6


def test_a_file_that_fails_to_decode_is_left_out_with_its_label(tmp_path: Path) -> None:
    from conftest import make_image_folder
    from test_data import _damaged_jpeg

    root = make_image_folder(tmp_path / "d", per_class=6, fmt="jpg")
    (root / "dog" / "damaged.jpg").write_bytes(_damaged_jpeg((root / "dog" / "0.jpg").read_bytes()))
    data = load_data(str(root), augment=Augmentation(), input_size=16, seed=0, val_fraction=0.3)
    in_train = any(p.endswith("damaged.jpg") for p, _ in data.train_samples)
    train, val = device_loaders(data, Augmentation(), CPU, batch_size=4, balance="sampler", seed=0, workers=0)
    kept = (train if in_train else val)
    samples = data.train_samples if in_train else data.val_samples
    expected = [label for p, label in samples if not p.endswith("damaged.jpg")]
    assert kept.labels.tolist() == expected and len(kept.images) == len(expected)
    assert list(kept.skipped) == [p for p, _ in samples if p.endswith("damaged.jpg")]
    assert (val if in_train else train).skipped == {}
    assert train.sample_weights is not None and len(train.sample_weights) == len(train.labels)

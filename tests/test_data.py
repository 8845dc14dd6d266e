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
    assert first.val_labels == again.val_labels and first.val_samples == again.val_samples
    assert first.val_samples != other.val_samples
    assert Counter(first.val_labels) == {0: 2, 1: 2, 2: 2}
    assert {p for p, _ in first.train_samples}.isdisjoint(p for p, _ in first.val_samples)
    assert [first.val[i][1] for i in range(len(first.val))] == first.val_labels  # the datasets follow the split


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


# --- the header scan, its record in the run directory, and files that fail only when decoded ---

def _old_decode_scan(root: Path) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """What the code before the header scan did: decode every file once (one core) through
    ImageFolder's is_valid_file, keeping the readable ones and why the others were skipped."""
    import os

    from torchvision import datasets

    skipped: dict[str, str] = {}

    def decodes(path: str) -> bool:
        if os.path.basename(path).startswith("."):
            return False
        try:
            open_rgb(path)
        except Exception as exc:
            skipped[os.path.relpath(path, root)] = str(exc).strip().splitlines()[0][:200]
            return False
        return True

    folder = datasets.ImageFolder(str(root), loader=open_rgb, is_valid_file=decodes, allow_empty=True)
    return folder.samples, skipped


def _damaged_jpeg(good: bytes) -> bytes:
    """A JPEG whose header and end marker are intact but whose Huffman table is garbage:
    the header scan passes it, decoding it fails."""
    start = good.find(b"\xff\xc4")
    damaged = bytearray(good)
    damaged[start + 5:start + 25] = b"\xff" * 20
    return bytes(damaged)


def _odd_folder(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "d", per_class=6)
    make_image_folder(root, per_class=3, classes={"cat": (200, 50, 50)}, fmt="jpg", seed=5)
    (root / "cat" / "notes.jpg").write_text("this is not an image")
    good_png = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    good_jpg = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (root / "owl" / "empty.png").write_bytes(b"")
    (root / "owl" / ".hidden.png").write_bytes(good_png)
    (root / "owl" / "readme.txt").write_text("a stray file")
    (root / "owl" / "nested").mkdir()
    (root / "owl" / "nested" / "deep.png").write_bytes(good_png)
    for mode in ("L", "RGBA", "P", "CMYK", "I;16", "LA", "1"):
        _save_mode(root / "dog" / f"odd_{mode.replace(';', '_')}.png", mode)
    return root


def test_header_scan_finds_what_decoding_every_file_found(tmp_path: Path) -> None:
    root = _odd_folder(tmp_path)
    old_samples, old_skipped = _old_decode_scan(root)
    bundle = load_data(str(root), augment=AUG, seed=0)
    new_samples = sorted(bundle.train_samples + bundle.val_samples)
    assert new_samples == sorted(old_samples)
    assert {e["path"]: e["reason"] for e in bundle.skipped_files} == old_skipped
    assert {"cat/truncated.jpg", "dog/truncated.png", "cat/notes.jpg", "owl/empty.png", "owl/readme.txt"} == set(old_skipped)
    # the same on more files than one process reads alone (the parallel path)
    big = make_image_folder(tmp_path / "big", per_class=120)
    (big / "cat" / "bad.png").write_bytes((big / "dog" / "0.png").read_bytes()[:40])
    old_samples, old_skipped = _old_decode_scan(big)
    bundle = load_data(str(big), augment=AUG, seed=0)
    assert sorted(bundle.train_samples + bundle.val_samples) == sorted(old_samples)
    assert {e["path"]: e["reason"] for e in bundle.skipped_files} == old_skipped == {"cat/bad.png": old_skipped["cat/bad.png"]}
    assert bundle.scan.stats["headers_read"] == 361


def _count_image_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_reopening_a_run_reads_the_record_not_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.config import RunConfig
    from compress.data import SCAN_RECORD
    from compress.pipeline import open_run

    root = make_split_folder(tmp_path / "d")
    config = RunConfig(data=str(root), arch="resnet20", device="cpu", input_size=16)
    first = open_run(tmp_path / "run", config)
    assert (tmp_path / "run" / SCAN_RECORD).is_file()
    assert first.manifest["dataset"]["scan"]["headers_read"] == 42
    opened = _count_image_opens(monkeypatch)
    again = open_run(tmp_path / "run", None)
    assert opened == []
    assert again.manifest["dataset"]["scan"]["reused"] is True
    assert again.data.train_labels == first.data.train_labels and again.data.val_labels == first.data.val_labels
    assert [s for s in again.data.train.samples] == [s for s in first.data.train.samples]
    assert again.preprocessing == first.preprocessing


def test_a_changed_folder_is_noticed_and_only_changed_files_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compress.data import SCAN_RECORD

    root = make_image_folder(tmp_path / "d", per_class=6)
    record = tmp_path / "run" / SCAN_RECORD
    first = load_data(str(root), augment=AUG, seed=0, scan_record=record)
    first.scan.save(record)
    (root / "cat" / "0.png").unlink()  # removed
    (root / "dog" / "new.png").write_bytes((root / "dog" / "1.png").read_bytes())  # added
    (root / "owl" / "2.png").write_text("now broken")  # rewritten in place: another size
    opened = _count_image_opens(monkeypatch)
    second = load_data(str(root), augment=AUG, seed=0, scan_record=record)
    assert sorted(Path(p).name for p in opened) == ["2.png", "new.png"]
    assert second.scan.stats["reused"] is False and second.scan.stats["headers_read"] == 2
    assert second.scan.stats["removed"] == 1
    assert len(second.train_labels) + len(second.val_labels) == 17
    assert [e["path"] for e in second.skipped_files] == ["owl/2.png"]
    assert not any(p.endswith("cat/0.png") for p, _ in second.train_samples + second.val_samples)


def test_a_file_that_fails_to_decode_is_left_out_of_its_batch(tmp_path: Path) -> None:
    from compress.data import DecodeFailure, SkippingDataLoader

    root = make_image_folder(tmp_path / "d", per_class=4, fmt="jpg")
    (root / "dog" / "damaged.jpg").write_bytes(_damaged_jpeg((root / "dog" / "0.jpg").read_bytes()))
    bundle = load_data(str(root), augment=AUG, seed=0, val_fraction=0.25)
    assert bundle.skipped_files == []  # the header scan cannot see this damage
    dataset = bundle.train if any(p.endswith("damaged.jpg") for p, _ in bundle.train_samples) else bundle.val
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("damaged.jpg"))
    assert isinstance(dataset[index], DecodeFailure)
    for workers in (0, 2):
        loader = SkippingDataLoader(dataset, batch_size=5, num_workers=workers)
        labels = [label for _, batch_labels in loader for label in batch_labels.tolist()]
        assert labels == [t for i, t in enumerate(dataset.targets) if i != index]  # no wrong label, none lost
        assert list(loader.skipped) == [dataset.samples[index][0]]
        assert "broken data stream" in loader.skipped[dataset.samples[index][0]]


def test_training_goes_on_past_a_file_that_fails_to_decode(tmp_path: Path) -> None:
    import json

    from compress.cli import main

    from conftest import TINY_OPTIONS

    root = make_image_folder(tmp_path / "d", per_class=8, fmt="jpg")
    (root / "cat" / "damaged.jpg").write_bytes(_damaged_jpeg((root / "cat" / "0.jpg").read_bytes()))
    good = (root / "owl" / "0.jpg").read_bytes()
    (root / "owl" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    main(["finetune", "--data", str(root), "--out", str(out), "--workers", "1", *TINY_OPTIONS])  # SystemExit on failure
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {e["path"]: e for e in manifest["dataset"]["skipped_files"]}
    assert set(skipped) == {"cat/damaged.jpg", "owl/truncated.jpg"}
    assert skipped["cat/damaged.jpg"]["stage"] == "decode" and "stage" not in skipped["owl/truncated.jpg"]
    assert manifest["dataset"]["decode_failures"] == 1
    assert manifest["steps"][0]["step"] == 0 and 0.0 <= manifest["steps"][0]["accuracy"] <= 1.0


def test_compress_data_describes_a_folder_and_refuses_an_unusable_one(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    import json

    from compress.cli import main

    root = tmp_path / "d"
    for name, count in {"cat": 12, "dog": 6, "owl": 3}.items():
        make_image_folder(root / "train", per_class=count, classes={name: (100, 100, 100)})
        make_image_folder(root / "val", per_class=2, classes={name: (100, 100, 100)})
    (root / "train" / "cat" / "broken.png").write_text("no")
    main(["data", str(root), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "train+val" and info["classes"] == ["cat", "dog", "owl"]
    assert info["class_counts"]["train"] == {"cat": 12, "dog": 6, "owl": 3}
    assert info["imbalance_ratio"] == 4.0
    assert info["skipped_files"] == [{"path": "train/cat/broken.png", "reason": info["skipped_files"][0]["reason"]}]
    assert info["image_sizes"]["width"]["median"] == 20 and info["image_sizes"]["formats"] == {"PNG": 27}
    assert info["preprocessing"]["input_size"] == 32
    main(["data", str(root)])
    text = capsys.readouterr().out
    assert "imbalance (largest / smallest class in train): 4.00" in text and "train/cat/broken.png" in text
    assert "input size a run would choose: 32" in text
    (root / "val" / "owl").rename(root / "val" / "eagle")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", str(root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "different class folders" in err and "Traceback" not in err

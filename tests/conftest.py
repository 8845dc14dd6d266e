"""Shared fixtures: tiny image folders written as real files, and one tiny finished run that
the bench and serve tests reuse (made once per test session)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")

CLASS_COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "owl": (50, 70, 230)}


def class_image(colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """A learnable picture: the class colour plus noise, with a random darker square."""
    base = np.array(colour, dtype=np.float64)[None, None, :] * rng.uniform(0.7, 1.0)
    pixels = base + rng.normal(0, 25, (size, size, 3))
    x, y = rng.integers(0, size // 2, 2)
    pixels[y:y + size // 3, x:x + size // 3] *= 0.5
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(root: Path, *, per_class: int = 12, size: int = 20, classes: dict | None = None,
                      seed: int = 0, fmt: str = "png") -> Path:
    """Write ``root/<class>/<i>.<fmt>`` images."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or CLASS_COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            class_image(colour, size, rng).save(folder / f"{index}.{fmt}")
    return root


def make_split_folder(root: Path, *, train: int = 10, val: int = 4, size: int = 20, seed: int = 0) -> Path:
    make_image_folder(root / "train", per_class=train, size=size, seed=seed)
    make_image_folder(root / "val", per_class=val, size=size, seed=seed + 1)
    return root


TINY_OPTIONS = ["--arch", "resnet20", "--epochs", "2", "--prune-steps", "1", "--target-macs", "0.6",
                "--retrain-epochs", "1", "--batch-size", "16", "--input-size", "16", "--latency-batch", "8",
                "--device", "cpu", "--timing-seconds", "0.2"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-data"), per_class=16)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A finished `compress run` (fine-tune, one pruning step, ONNX, report) on tiny data."""
    from compress.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    main(["run", "--data", str(tiny_data), "--out", str(out), *TINY_OPTIONS])  # raises SystemExit on failure
    return out


def cuda_available() -> bool:
    """Whether this machine can run the CUDA paths: a torch CUDA device and ONNX Runtime's CUDA
    provider with a driver. The suite is right either way; ``-m gpu`` tests need it."""
    import torch

    from compress.runtime.sessions import cuda_unavailable_reason

    return torch.cuda.is_available() and cuda_unavailable_reason() is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests are skipped cleanly without CUDA (run them with ``pytest -m gpu``)."""
    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA (a torch CUDA device and ONNX Runtime's CUDA provider)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def run_bench_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``bench.cli.main(args)`` in process: (exit code, stdout, stderr)."""
    from bench.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err

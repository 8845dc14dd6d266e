"""Benchmark of opening an image folder and of the training input pipeline at 224 px.

    python -m bench.data_scan [--files 20000] [--root /tmp/compress-data-scan] [--out results.json]

1. Generates (once; kept for later runs) a folder of photo-sized JPEGs (1024x768, smooth
   random colour fields with fine noise, quality 90; 400 distinct pictures, each file its
   own copy) as ``train/<class>`` + ``val/<class>`` under ``--root``, outside the repository.
2. Scan time: the code before the header scan (every file decoded once through
   ImageFolder's ``is_valid_file``, one core), against ``load_data`` first open (parallel
   header scan) and reopen (the stored scan record).
3. Training input throughput at 224 px (images/s, train transforms, same batch size and
   workers): the run's loader (``make_loaders``) against plain torchvision ImageFolder +
   DataLoader, and the run's loader without JPEG draft decoding, interleaved in rounds.
The load average is recorded next to every figure: the machine may be shared."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

WIDTH, HEIGHT = 1024, 768


UNIQUE = 400  # distinct pictures encoded; every other file is a byte copy of one (its own inode)


def _encode(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(field).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, (HEIGHT, WIDTH, 1), dtype=np.int16), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def generate(root: Path, files: int, classes: int = 20, val_fraction: float = 0.05) -> Path:
    """``files`` JPEGs under ``root/train`` and ``root/val`` (kept: a later run reuses them).
    ``UNIQUE`` pictures are encoded (in parallel) and written out as separate files in turn:
    every file costs a scan or a decode what a distinct photo of that size would."""
    marker = root / f".complete-{files}"
    if marker.exists():
        return root
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        pictures = list(pool.map(_encode, range(UNIQUE), chunksize=8))
    per_class = files // classes
    val_count = max(1, round(per_class * val_fraction))
    written = 0
    for index in range(classes):
        for split, count in (("train", per_class - val_count), ("val", val_count)):
            folder = root / split / f"class_{index:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                (folder / f"{split}_{index:03d}_{n:05d}.jpg").write_bytes(pictures[written % UNIQUE])
                written += 1
    print(f"generated {written} JPEGs ({UNIQUE} distinct pictures) in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    marker.write_text("")
    return root


def _timed(action: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    return result, {"seconds": round(seconds, 2), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def decode_every_file(root: Path) -> int:
    """What opening a data set did before the header scan (``_ValidatingLoader``): decode every
    file once, on one core, through ImageFolder's ``is_valid_file``."""
    from torchvision import datasets

    from compress.imaging import open_rgb

    def decodes(path: str) -> bool:
        try:
            open_rgb(path)
        except Exception:
            return False
        return True

    return sum(len(datasets.ImageFolder(str(root / split), loader=open_rgb, is_valid_file=decodes).samples)
               for split in ("train", "val"))


def loader_images_per_second(loader: Any, batches: int) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (workers started)."""
    iterator = iter(loader)
    next(iterator)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)[1])
    return images / (time.perf_counter() - started)


def cpu_seconds_per_image(dataset: Any, indices: list[int]) -> float:
    """CPU time of one process per image (decode + train transforms): far less sensitive than
    wall-clock images/s to other work on a shared machine."""
    import torch

    torch.manual_seed(0)  # the same random crops for every loader measured
    started = time.process_time()
    for index in indices:
        dataset[index]
    return (time.process_time() - started) / len(indices)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "compress-data-scan")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu-2core-data-scan/results.json"))
    parser.add_argument("--batches", type=int, default=20, help="batches per loader measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the loader measurements")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu-images", type=int, default=150, help="images per CPU-time measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-baseline", action="store_true", help="do not time the decode-every-file baseline")
    args = parser.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from bench.machine import machine_info
    from compress.data import Augmentation, ScannedImageFolder, load_data, make_loaders

    torch.set_num_threads(1)
    root = generate(args.root / f"photos-{args.files}", args.files)
    results: dict[str, Any] = {"files": args.files, "image_size": [WIDTH, HEIGHT], "root": str(root),
                               "command": " ".join(["python -m bench.data_scan"] + (argv or sys.argv[1:])),
                               "machine": machine_info(), "python": platform.python_version()}
    record = Path(tempfile.mkdtemp(prefix="data-scan-record-")) / "data_scan.json.gz"
    augment = Augmentation()
    bundle, first = _timed(lambda: load_data(str(root), augment=augment, scan_record=record))
    bundle.scan.save(record)
    first["images"] = len(bundle.train_labels) + len(bundle.val_labels)
    results["scan_first_open"] = first
    _, reopen = _timed(lambda: load_data(str(root), augment=augment, scan_record=record))
    results["scan_reopen"] = reopen
    results["scan_record_bytes"] = record.stat().st_size
    print(f"first open {first['seconds']} s, reopen {reopen['seconds']} s", file=sys.stderr)
    if not args.skip_baseline:
        count, baseline = _timed(lambda: decode_every_file(root))
        baseline["images"] = count
        results["scan_decode_every_file_before"] = baseline
        print(f"decode every file (before): {baseline['seconds']} s", file=sys.stderr)
        results["scan_speedup_first_open"] = round(baseline["seconds"] / first["seconds"], 1)
        results["scan_speedup_reopen"] = round(baseline["seconds"] / reopen["seconds"], 1)

    pre = bundle.preprocessing
    assert pre.input_size == 224, pre
    transform = augment.train_transform(pre)
    ours, _ = make_loaders(bundle, batch_size=args.batch_size, balance="none", seed=0, workers=args.workers)
    no_draft = DataLoader(ScannedImageFolder(root / "train", bundle.classes, bundle.train.samples, transform),
                          batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          persistent_workers=True, generator=torch.Generator().manual_seed(0))
    plain = DataLoader(datasets.ImageFolder(str(root / "train"), transform=transform), batch_size=args.batch_size,
                       shuffle=True, num_workers=args.workers, persistent_workers=True,
                       generator=torch.Generator().manual_seed(0))
    candidates = {"compress (make_loaders)": ours, "compress without JPEG draft": no_draft,
                  "torchvision ImageFolder + DataLoader": plain}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in candidates}
    for round_ in range(args.rounds):
        for name, loader in candidates.items():
            rate, timing = _timed(lambda: loader_images_per_second(loader, args.batches))
            measured[name].append({"images_per_second": round(rate, 1), **timing})
            print(f"round {round_ + 1}: {name}: {rate:.1f} images/s", file=sys.stderr)
    results["loader"] = {
        "input_size": pre.input_size, "resize": pre.resize, "batch_size": args.batch_size, "workers": args.workers,
        "batches_per_measurement": args.batches, "rounds": args.rounds, "transform": repr(transform),
        "measurements": measured,
        "median_images_per_second": {name: statistics.median(m["images_per_second"] for m in runs)
                                     for name, runs in measured.items()},
    }
    datasets_measured = {"compress (make_loaders)": ours.dataset, "compress without JPEG draft": no_draft.dataset,
                         "torchvision ImageFolder + DataLoader": plain.dataset}
    indices = np.random.default_rng(0).choice(len(bundle.train_labels), args.cpu_images, replace=False).tolist()
    cpu: dict[str, list[float]] = {name: [] for name in datasets_measured}
    for round_ in range(args.rounds):
        for name, dataset in datasets_measured.items():
            cpu[name].append(round(cpu_seconds_per_image(dataset, indices) * 1000, 2))
            print(f"round {round_ + 1}: {name}: {cpu[name][-1]:.2f} CPU ms/image", file=sys.stderr)
    results["loader"]["cpu_ms_per_image"] = {
        "images": args.cpu_images, "process": "one (workers=0), torch threads 1", "measurements": cpu,
        "median": {name: statistics.median(values) for name, values in cpu.items()}}
    medians = results["loader"]["median_images_per_second"]
    results["loader"]["ratio_vs_torchvision"] = round(
        medians["compress (make_loaders)"] / medians["torchvision ImageFolder + DataLoader"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in results if k.startswith("scan")}
                     | {"loader": medians, "cpu_ms_per_image": results["loader"]["cpu_ms_per_image"]["median"]}, indent=2))


if __name__ == "__main__":
    main()

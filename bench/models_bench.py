"""``bench models RUN_DIR``: every step of a run, on every backend, at every batch size.

For one (backend, batch size) all steps are timed interleaved in the same process, so the
speed-up of step k against step 0 is a ratio measured in one run under the same conditions."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from compress.errors import UsageError
from compress.rundir import require_manifest

from .backends import BACKENDS, BackendUnavailable, Prepared, prepare
from .machine import machine_info
from .measure import interleaved, paired_speedup_spread, speedup, summarize

console = Console(stderr=True)


def validation_arrays(manifest: dict[str, Any], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images, preprocessed exactly as in training, as float32 NCHW."""
    from compress.config import RunConfig
    from compress.data import load_data

    stored = {k: v for k, v in manifest["config"].items() if k in RunConfig.option_names()}
    config = RunConfig(**stored)
    data = load_data(config.data, augment=config.augmentation(), val_fraction=config.val_fraction,
                     seed=config.seed, input_size=config.input_size)
    count = len(data.val) if limit is None else min(limit, len(data.val))
    images = np.stack([data.val[i][0].numpy() for i in range(count)]).astype(np.float32)
    labels = np.asarray([data.val_labels[i] for i in range(count)])
    return images, labels


def batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` images taken from the real ones, repeated when there are fewer."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def accuracy_of(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                batch: int = 256) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        logits = predict(images[start:start + batch])
        correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    return correct / max(len(labels), 1)


def onnx_variants(run_dir: Path, step: dict[str, Any]) -> list[tuple[str, Path]]:
    """(precision, path) of each ONNX file a step has: fp32 always, fp16 when exported."""
    variants = [("fp32", run_dir / step["onnx"])]
    if step.get("onnx_fp16"):
        variants.append(("fp16", run_dir / step["onnx_fp16"]))
    return variants


def benchmark_run(run_dir: Path, *, backends: Sequence[str] = ("ort-cpu", "torch"), batch_sizes: Sequence[int] = (1, 8, 64),
                  threads: int | None = None, warmup: int = 5, rounds: int = 20, per_round: int = 5,
                  min_seconds: float = 0.0, max_seconds: float = 30.0, measure_accuracy: bool = True,
                  steps: Sequence[int] | None = None) -> dict[str, Any]:
    """Measure a run's steps; returns the results document (see ``bench/README`` section)."""
    run_dir = Path(run_dir)
    manifest = require_manifest(run_dir)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if any(b < 1 for b in batch_sizes):
        raise UsageError("batch sizes must be >= 1")
    chosen = [s for s in manifest["steps"] if steps is None or s["step"] in steps]
    if not chosen or not all(s.get("onnx") for s in chosen):
        raise UsageError(f"{run_dir} has no exported steps to measure; run `compress run` (or `compress export`) first")
    if chosen[0]["step"] != 0:
        chosen = [s for s in manifest["steps"] if s["step"] == 0] + chosen
    started = time.time()
    images, labels = validation_arrays(manifest)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for backend in backends:
        precisions = ["fp32"] if backend == "torch" else sorted({p for s in chosen for p, _ in onnx_variants(run_dir, s)},
                                                                  key=lambda p: p != "fp32")
        for precision in precisions:
            prepared: dict[int, Prepared] = {}
            try:
                for step in chosen:
                    onnx_path = dict(onnx_variants(run_dir, step)).get(precision)
                    if onnx_path is None and backend != "torch":
                        continue
                    prepared[step["step"]] = prepare(backend, onnx_path=onnx_path, threads=threads,
                                                     checkpoint=run_dir / step["checkpoint"] if step.get("checkpoint") else None)
            except BackendUnavailable as exc:
                skipped.append({"backend": backend, "precision": precision, "reason": str(exc)})
                console.print(f"[yellow]{backend} {precision}: skipped ({exc})[/]")
                continue
            accuracies = {k: accuracy_of(p.predict, images, labels) for k, p in prepared.items()} if measure_accuracy else {}
            for batch in batch_sizes:
                data = batch_of(images, batch)
                runners = {k: p.make_timed(data) for k, p in prepared.items()}
                console.print(f"timing {backend} {precision} batch {batch}: steps {list(runners)} interleaved")
                samples = interleaved(runners, warmup=warmup, rounds=rounds, per_round=per_round,
                                      min_seconds=min_seconds, max_seconds=max_seconds)
                stats = {k: summarize(v, batch) for k, v in samples.items()}
                base = stats.get(0)
                for k, stat in stats.items():
                    entry: dict[str, Any] = {"step": k, "backend": backend, "precision": precision, "batch": batch,
                                             "device": prepared[k].device, "latency": stat.to_dict(),
                                             "accuracy": accuracies.get(k)}
                    if base is not None:
                        low, high = paired_speedup_spread(samples[0], samples[k], per_round)
                        entry["speedup"] = speedup(base, stat)
                        entry["speedup_band"] = [low, high]
                    results.append(entry)
    steps_info = [{key: s.get(key) for key in ("step", "macs", "params", "accuracy", "onnx", "onnx_bytes", "parity", "widths")}
                  for s in chosen]
    base_macs = chosen[0]["macs"]
    for info in steps_info:
        info["macs_ratio"] = info["macs"] / base_macs if base_macs else None
    return {
        "kind": "bench-models",
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "settings": {"backends": list(backends), "batch_sizes": list(batch_sizes), "threads": threads,
                     "warmup": warmup, "rounds": rounds, "per_round": per_round, "max_seconds": max_seconds,
                     "validation_images": int(len(labels))},
        "machine": machine_info(threads),
        "dataset": {"classes": manifest["dataset"]["classes"], "val": manifest["dataset"]["val"]},
        "steps": steps_info,
        "results": results,
        "skipped": skipped,
    }

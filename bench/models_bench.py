"""``bench models RUN_DIR``: every step of a run, on every backend, at every batch size.

For one (backend, batch size) all steps are timed interleaved in the same process, so the
speed-up of step k against step 0 is a ratio measured in one run under the same conditions."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from compress.errors import UsageError
from compress.rundir import require_manifest

from .backends import ONNX_BACKENDS, BackendUnavailable, Prepared, check_options, prepare
from .hints import unaligned_convs
from .machine import load_average, machine_info
from .measure import NOISY_SPEEDUP_BAND, interleaved, paired_speedup_spread, speedup, summarize

console = Console(stderr=True)


def validation_arrays(manifest: dict[str, Any], limit: int | None = None,
                      data: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images, preprocessed exactly as in training, as float32 NCHW.
    ``data`` is the run's already loaded ``DataBundle`` (saves scanning the folder again)."""
    from compress.config import RunConfig
    from compress.data import load_data

    if data is None:
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


def choose_steps(run_dir: Path, manifest: dict[str, Any], steps: Sequence[int] | None) -> list[dict[str, Any]]:
    """The manifest entries to measure; step 0 is always among them, as the speed-up baseline."""
    available = {s["step"]: s for s in manifest["steps"]}
    if steps is not None:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise UsageError(f"{run_dir} has no step(s) {missing}; it has steps {sorted(available)}")
    chosen = [s for k, s in sorted(available.items()) if steps is None or k in steps or k == 0]
    if not chosen or chosen[0]["step"] != 0 or not all(s.get("onnx") for s in chosen):
        raise UsageError(f"{run_dir} has no exported steps to measure; run `compress run` (or `compress export`) first")
    for step in chosen:
        for _, path in onnx_variants(run_dir, step):
            if not path.is_file():
                raise UsageError(f"{path} is missing (listed in {run_dir}/manifest.json)")
    return chosen


def _prepare_all(run_dir: Path, chosen: list[dict[str, Any]], backend: str, precision: str,
                 threads: int | None) -> dict[int, Prepared]:
    """Every chosen step loaded on one backend; raises BackendUnavailable if any cannot be."""
    prepared: dict[int, Prepared] = {}
    for step in chosen:
        onnx_path = dict(onnx_variants(run_dir, step)).get(precision)
        if onnx_path is None and backend in ONNX_BACKENDS:
            continue
        checkpoint = run_dir / step["checkpoint"] if step.get("checkpoint") else None
        prepared[step["step"]] = prepare(backend, onnx_path=onnx_path, checkpoint=checkpoint, threads=threads)
    if 0 not in prepared:
        raise BackendUnavailable(f"step 0 has no {precision} model for {backend}")
    return prepared


def _precisions(backend: str, run_dir: Path, chosen: list[dict[str, Any]]) -> list[str]:
    if backend not in ONNX_BACKENDS:
        return ["fp32"]
    found = {p for s in chosen for p, _ in onnx_variants(run_dir, s)}
    return sorted(found, key=lambda p: p != "fp32")


def step_summary(run_dir: Path, chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the report says about each step: size, MACs ratio, manifest accuracy, parity, and
    the hardware hints read from its ONNX file."""
    base_macs = chosen[0]["macs"]
    out = []
    for step in chosen:
        info = {key: step.get(key) for key in ("step", "macs", "params", "accuracy", "onnx", "onnx_fp16",
                                               "onnx_bytes", "parity", "widths")}
        info["macs_ratio"] = step["macs"] / base_macs if base_macs else None
        info["hints"] = unaligned_convs(run_dir / step["onnx"])
        out.append(info)
    return out


def benchmark_run(run_dir: Path, *, backends: Sequence[str] = ("ort-cpu", "torch"), batch_sizes: Sequence[int] = (1, 8, 64),
                  threads: int | None = None, warmup: int = 5, rounds: int = 20, per_round: int | None = None,
                  min_seconds: float = 0.0, max_seconds: float = 30.0, measure_accuracy: bool = True,
                  steps: Sequence[int] | None = None, data: Any = None) -> dict[str, Any]:
    """Measure a run's steps; returns the results document (``kind: bench-models``).

    For each backend and precision, all steps are loaded together; for each batch size they
    are timed interleaved (``max_seconds`` bounds one such group). A backend that cannot run
    here (no GPU, a provider that does not load, an fp16 file the provider cannot run) is
    listed in ``skipped`` with the reason instead of failing the benchmark."""
    run_dir = Path(run_dir)
    check_options(backends, batch_sizes, threads)
    manifest = require_manifest(run_dir)
    chosen = choose_steps(run_dir, manifest, steps)
    started = time.time()
    machine = machine_info(threads)
    # latency needs only a batch of real images; accuracy needs them all
    images, labels = validation_arrays(manifest, limit=None if measure_accuracy else max(batch_sizes), data=data)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for backend in backends:
        for precision in _precisions(backend, run_dir, chosen):
            try:
                prepared = _prepare_all(run_dir, chosen, backend, precision, threads)
            except BackendUnavailable as exc:
                skipped.append({"backend": backend, "precision": precision, "reason": str(exc)})
                console.print(f"[yellow]{backend} {precision}: skipped ({exc})[/]")
                continue
            accuracies = {k: accuracy_of(p.predict, images, labels) for k, p in prepared.items()} if measure_accuracy else {}
            for batch in batch_sizes:
                results.extend(_time_group(prepared, backend, precision, batch, batch_of(images, batch), accuracies,
                                           warmup=warmup, rounds=rounds, per_round=per_round,
                                           min_seconds=min_seconds, max_seconds=max_seconds))
            del prepared  # free sessions (and their thread pools) before the next backend
    return {
        "kind": "bench-models",
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "settings": {"backends": list(backends), "batch_sizes": list(batch_sizes), "threads": threads,
                     "steps": [s["step"] for s in chosen], "warmup": warmup, "rounds": rounds,
                     "per_round": per_round or "about 0.1 s of calls",
                     "min_seconds": min_seconds, "max_seconds": max_seconds, "accuracy": measure_accuracy,
                     "ort_intra_op_spinning": False,
                     "validation_images": int(len(labels))},
        "machine": machine,
        "load_average_end": load_average(),
        "dataset": {"classes": manifest["dataset"]["classes"], "val": manifest["dataset"]["val"],
                    "source": manifest["dataset"].get("source")},
        "arch": manifest["config"].get("arch"),
        "input_size": (manifest.get("preprocessing") or {}).get("input_size"),
        "steps": step_summary(run_dir, chosen),
        "results": results,
        "skipped": skipped,
    }


def _time_group(prepared: dict[int, Prepared], backend: str, precision: str, batch: int, data: np.ndarray,
                accuracies: dict[int, float], **timing: Any) -> list[dict[str, Any]]:
    """Time all steps of one (backend, precision, batch) interleaved; one result row per step."""
    runners = {k: p.make_timed(data) for k, p in prepared.items()}
    console.print(f"timing {backend} {precision} batch {batch}: steps {list(runners)} interleaved")
    timed = interleaved(runners, **timing)
    stats = {k: summarize(v, batch) for k, v in timed.samples.items()}
    rows = []
    for k, stat in stats.items():
        low, high = paired_speedup_spread(timed.samples[0], timed.samples[k], timed.per_round)
        ratio = speedup(stats[0], stat)
        rows.append({"step": k, "backend": backend, "precision": precision, "batch": batch,
                     "device": prepared[k].device, "latency": stat.to_dict(), "accuracy": accuracies.get(k),
                     "speedup": ratio, "speedup_band": [low, high],
                     "speedup_noisy": bool(k != 0 and not math.isnan(high) and (high - low) > NOISY_SPEEDUP_BAND * ratio),
                     "rounds": timed.rounds, "per_round": timed.per_round})
    return rows

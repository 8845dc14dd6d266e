"""Measuring a run's models: every (step, precision) on every backend at every batch size.

For one (backend, batch size) every step and precision is timed interleaved in the same
process, so the speed-up of any of them against step 0 fp32 is a ratio measured in one run
under the same conditions. Used by ``bench models``, the closing report of ``compress run``
and ``--target-speedup``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from .backends import (CPU_ONNX_BACKENDS, ONNX_BACKENDS, TORCH_CUDA_BACKENDS, BackendUnavailable, Prepared,
                       check_options, prepare)
from .errors import UsageError
from .hints import unaligned_convs
from .manifest import RunManifest, StepRecord
from .rundir import require_manifest
from .runtime.machine import load_average, machine_info
from .runtime.timing import compare_interleaved, interleaved, paired_speedup_spread, speedup, summarize

console = Console(stderr=True)
BASELINE = (0, "fp32")  # every speed-up is against step 0 fp32
Key = tuple[int, str]  # (step, precision)
# Why a precision is not measured on a backend (said plainly in the results, never hidden).
NOT_ON_BACKEND = {
    ("ort-cuda", "int8"): "ONNX Runtime's CUDA provider has no int8 convolution kernels: a QDQ model would run "
                          "DequantizeLinear + fp32 Conv on the GPU and QOperator's QLinearConv on the CPU, so int8 "
                          "is a CPU variant here (GPU int8 needs the TensorRT provider)",
}


def load_run_data(manifest: dict[str, Any]) -> Any:
    """The run's ``DataBundle``, loaded as the run loaded it (for a report made without one)."""
    from .config import RunConfig

    return RunConfig.from_manifest(manifest).load_data()


def validation_arrays(manifest: dict[str, Any], limit: int | None = None,
                      data: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation images, preprocessed exactly as in training, as float32 NCHW.
    ``data`` is the run's already loaded ``DataBundle`` (saves scanning the folder again)."""
    if data is None:
        data = load_run_data(manifest)
    from .data import DecodeFailure

    count = len(data.val) if limit is None else min(limit, len(data.val))
    items = [(data.val[i], data.val_labels[i]) for i in range(count)]
    kept = [(item[0].numpy(), label) for item, label in items if not isinstance(item, DecodeFailure)]
    if not kept:
        raise UsageError("no validation image could be decoded")
    images = np.stack([image for image, _ in kept]).astype(np.float32)
    labels = np.asarray([label for _, label in kept])
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


def choose_steps(run_dir: Path, manifest: RunManifest, steps: Sequence[int] | None,
                 precisions: Sequence[str] | None = None) -> list[StepRecord]:
    """The steps to measure; step 0 is always among them, as the speed-up baseline."""
    available = {s.step: s for s in manifest.steps}
    if steps is not None:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise UsageError(f"{run_dir} has no step(s) {missing}; it has steps {sorted(available)}")
    chosen = [s for k, s in sorted(available.items()) if steps is None or k in steps or k == 0]
    if not chosen or chosen[0].step != 0 or not all(s.onnx for s in chosen):
        raise UsageError(f"{run_dir} has no exported steps to measure; run `compress run` (or `compress export`) first")
    for step in chosen:
        for precision in step.variants:
            if precisions is not None and precision not in precisions:
                continue
            path = step.variant_path(run_dir, precision)
            if not path.is_file():
                raise UsageError(f"{path} is missing (listed in {run_dir}/manifest.json)")
    return chosen


def _keys(backend: str, chosen: list[StepRecord], precisions: Sequence[str] | None) -> list[Key]:
    """The (step, precision) pairs a backend measures: every variant on ONNX Runtime, the
    checkpoint (fp32) on PyTorch, and in fp16 too on PyTorch's CUDA backends when the run has
    that variant (the same precisions side by side)."""
    if backend in TORCH_CUDA_BACKENDS:
        return [(s.step, p) for s in chosen for p in ("fp32", "fp16")
                if p in s.variants and (p == "fp32" or precisions is None or p in precisions)]
    if backend not in ONNX_BACKENDS:
        return [(s.step, "fp32") for s in chosen]
    return [(s.step, p) for s in chosen for p in s.variants if precisions is None or p in precisions]


def recorded_threads(step: StepRecord, precision: str, batch: int) -> int | None:
    """The intra-op thread count chosen for this variant at this batch size when it was built
    (``cpu_threads`` in its manifest record; 0 = ORT's default), or None when none was recorded."""
    variant = step.variants.get(precision)
    by_batch = ((variant.details.get("cpu_threads") or {}).get("by_batch") or {}) if variant else {}
    choice = by_batch.get(str(batch))
    return int(choice["threads"]) if choice else None


def threads_for(backend: str, step: StepRecord, precision: str, batch: int, forced: int | None) -> int | None:
    """Threads a model is timed with: ``--threads`` when given, else on ORT CPU (and OpenVINO,
    so that both run the file with the same threads) the variant's recorded choice for this
    batch size, else the library's default (None)."""
    if forced is not None or backend not in CPU_ONNX_BACKENDS:
        return forced
    return recorded_threads(step, precision, batch) or None


def _prepare_all(run_dir: Path, chosen: list[StepRecord], backend: str, keys: list[Key], threads: int | None,
                 skipped: list[dict[str, str]], batch: int | None = None,
                 cache: dict[tuple[Key, int | None], Prepared] | None = None) -> dict[Key, Prepared]:
    """Every (step, precision) loaded on one backend, with the threads it is timed with at
    ``batch`` (see :func:`threads_for`; sessions are reused from ``cache``). One that cannot run
    is listed in ``skipped``; without step 0 fp32 (the baseline) the whole backend is unavailable."""
    steps = {s.step: s for s in chosen}
    cache = {} if cache is None else cache
    prepared: dict[Key, Prepared] = {}
    for step, precision in keys:
        reason = NOT_ON_BACKEND.get((backend, precision))
        if reason is None:
            record = steps[step]
            checkpoint = run_dir / record.checkpoint if record.checkpoint else None
            use = threads if batch is None else threads_for(backend, record, precision, batch, threads)
            try:
                if ((step, precision), use) not in cache:
                    cache[((step, precision), use)] = prepare(backend, onnx_path=record.variant_path(run_dir, precision),
                                                              checkpoint=checkpoint, threads=use,
                                                              precision=precision)
                prepared[(step, precision)] = cache[((step, precision), use)]
                continue
            except BackendUnavailable as exc:
                if (step, precision) == BASELINE:
                    raise
                reason = str(exc)
        if not any(s.get("precision") == precision and s.get("backend") == backend and s.get("reason") == reason
                   for s in skipped):
            skipped.append({"backend": backend, "precision": precision, "reason": reason})
            console.print(f"[yellow]{backend} {precision}: skipped ({reason})[/]")
    return prepared


def step_summary(run_dir: Path, chosen: list[StepRecord]) -> list[dict[str, Any]]:
    """What the report says about each step: size, MACs ratio, accuracy, parity, its variants,
    and the hardware hints read from its ONNX file."""
    base_macs = chosen[0].macs
    out = []
    for step in chosen:
        info = {"step": step.step, "macs": step.macs, "params": step.params, "accuracy": step.accuracy,
                "onnx": step.onnx, "onnx_bytes": step.variants["fp32"].bytes if "fp32" in step.variants else None,
                "parity": step.parity, "widths": step.raw.get("widths"),
                "variants": {p: v.to_dict() for p, v in step.variants.items()}}
        info["macs_ratio"] = step.macs / base_macs if base_macs else None
        info["hints"] = unaligned_convs(run_dir / step.onnx)
        out.append(info)
    return out


def benchmark_run(run_dir: Path, *, backends: Sequence[str] = ("ort-cpu", "torch"), batch_sizes: Sequence[int] = (1, 8, 64),
                  threads: int | None = None, warmup: int = 5, rounds: int = 20, per_round: int | None = None,
                  min_seconds: float = 0.0, max_seconds: float = 30.0, measure_accuracy: bool = True,
                  steps: Sequence[int] | None = None, precisions: Sequence[str] | None = None,
                  data: Any = None) -> dict[str, Any]:
    """Measure a run's steps and their precision variants; returns the results document
    (``kind: bench-models``).

    For each backend, every (step, precision) is loaded together; for each batch size they are
    timed interleaved (``max_seconds`` bounds one such group). What cannot run here (no GPU, a
    provider that does not load, int8 on CUDA) is listed in ``skipped`` with the reason instead
    of failing the benchmark or being reported under another name."""
    run_dir = Path(run_dir)
    check_options(backends, batch_sizes, threads)
    manifest = RunManifest.from_dict(require_manifest(run_dir))
    chosen = choose_steps(run_dir, manifest, steps, precisions)
    started = time.time()
    machine = machine_info(threads)
    # latency needs only a batch of real images; accuracy needs them all
    images, labels = validation_arrays(manifest.raw, limit=None if measure_accuracy else max(batch_sizes), data=data)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for backend in backends:
        keys = _keys(backend, chosen, precisions)
        cache: dict[tuple[Key, int | None], Prepared] = {}
        try:
            prepared = {batch: _prepare_all(run_dir, chosen, backend, keys, threads, skipped, batch, cache)
                        for batch in batch_sizes}
        except BackendUnavailable as exc:
            skipped.append({"backend": backend, "precision": "all", "reason": str(exc)})
            console.print(f"[yellow]{backend}: skipped ({exc})[/]")
            continue
        first = prepared[batch_sizes[0]]
        accuracies = {k: accuracy_of(p.predict, images, labels) for k, p in first.items()} if measure_accuracy else {}
        for batch in batch_sizes:
            results.extend(time_group(prepared[batch], backend, batch, batch_of(images, batch), accuracies,
                                      warmup=warmup, rounds=rounds, per_round=per_round, min_seconds=min_seconds,
                                      max_seconds=max_seconds))
        del prepared, first, cache  # free sessions (and their thread pools) before the next backend
    return {
        "kind": "bench-models",
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "settings": {"backends": list(backends), "batch_sizes": list(batch_sizes), "threads": threads,
                     "threads_rule": (f"forced: {threads}" if threads else
                                      "ort-cpu and openvino: each model with the intra-op threads recorded as fastest "
                                      "for it on ORT CPU at that batch size when its variant was built (manifest: "
                                      "variants.*.cpu_threads), else the library's default; other backends: the "
                                      "library's default"),
                     "steps": [s.step for s in chosen], "precisions": list(precisions) if precisions else "all",
                     "warmup": warmup, "rounds": rounds, "per_round": per_round or "about 0.1 s of calls",
                     "min_seconds": min_seconds, "max_seconds": max_seconds, "accuracy": measure_accuracy,
                     "ort_intra_op_spinning": False, "speedup_baseline": "step 0 fp32, same backend and batch",
                     "validation_images": int(len(labels))},
        "machine": machine,
        "load_average_end": load_average(),
        "dataset": {"classes": manifest.classes, "val": manifest.raw["dataset"]["val"],
                    "source": manifest.raw["dataset"].get("source")},
        "arch": manifest.arch,
        "input_size": manifest.preprocessing.get("input_size"),
        "steps": step_summary(run_dir, chosen),
        "results": results,
        "skipped": skipped,
    }


def time_group(prepared: dict[Key, Prepared], backend: str, batch: int, data: np.ndarray,
               accuracies: dict[Key, float], **timing: Any) -> list[dict[str, Any]]:
    """Time every (step, precision) of one backend at one batch size, interleaved; one result
    row per model, with its speed-up against step 0 fp32."""
    runners = {k: p.make_timed(data) for k, p in prepared.items()}
    console.print(f"timing {backend} batch {batch}: {len(runners)} models interleaved")
    measured = compare_interleaved(runners, batch, BASELINE if BASELINE in runners else next(iter(runners)), **timing)
    rows = []
    for (step, precision), result in measured.items():
        model = prepared[(step, precision)]
        rows.append({"step": step, "backend": backend, "precision": precision, "batch": batch, "device": model.device,
                     "intra_op_threads": (model.info.get("session") or {}).get("intra_op_threads"),
                     "accuracy": accuracies.get((step, precision)), **result})
    return rows


def measure_step_speedup(run_dir: Path, manifest: dict[str, Any], step: int, *, backend: str = "ort-cpu",
                         batch: int = 1, rounds: int = 20, per_round: int | None = None, min_seconds: float = 2.0,
                         max_seconds: float = 20.0, data: Any = None) -> dict[str, Any]:
    """Median-latency ratio step 0 / ``step`` (fp32) on ``backend`` at ``batch``, interleaved:
    what ``--target-speedup`` steers by. Raises ``BackendUnavailable`` when the backend cannot
    run here."""
    run_dir = Path(run_dir)
    records = {s.step: s for s in RunManifest.from_dict(manifest).steps}
    images, _ = validation_arrays(manifest, limit=max(batch, 64), data=data)
    fixed = batch_of(images, batch)
    runners = {}
    device = None
    for k in (0, step):
        record = records[k]
        prepared = prepare(backend, onnx_path=run_dir / record.onnx, checkpoint=run_dir / record.checkpoint, threads=None)
        device = prepared.device
        runners[k] = prepared.make_timed(fixed)
    timed = interleaved(runners, rounds=rounds, per_round=per_round, min_seconds=min_seconds, max_seconds=max_seconds)
    base, other = summarize(timed.samples[0], batch), summarize(timed.samples[step], batch)
    low, high = paired_speedup_spread(timed.samples[0], timed.samples[step], timed.per_round)
    return {"backend": backend, "device": device, "batch": batch, "speedup": speedup(base, other),
            "speedup_band": [low, high], "step0_p50_ms": base.p50_ms, "p50_ms": other.p50_ms}

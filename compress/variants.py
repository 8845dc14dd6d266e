"""Precision variants of a step: build each one from the step's fp32 ONNX file and measure it
against that fp32 file on the whole validation split, all through one mechanism.

- ``fp16``: onnxconverter-common, inputs and outputs kept fp32 (``export.export_fp16``).
- ``int8``: ONNX Runtime static quantization (``quantize``), the format chosen by measuring.

Every variant's manifest record has ``onnx``, ``bytes``, ``accuracy`` (top-1 through ONNX
Runtime on the whole validation split), ``top1_agreement`` and ``max_abs_diff`` against the
same step's fp32, ``accuracy_drop`` and ``flagged`` (lost more than ``--max-accuracy-drop``),
and ``cpu_threads``: the ONNX Runtime intra-op thread count that ran it fastest here at each
measured batch size (see :func:`choose_threads`)."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import export as onnx_export
from . import quantize
from .data import DataBundle, SkippingDataLoader
from .errors import UsageError
from .runtime.precisions import VARIANT_FILES
from .runtime.sessions import OrtModel, SessionSettings
from .runtime.timing import Timer

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def evaluation_provider(variant: str, device: str) -> str:
    """Where a variant's accuracy is measured: where it will be deployed. On a run that trains
    on CUDA, fp32 and fp16 go through ONNX Runtime's CUDA provider (``auto``: the CPU when
    onnxruntime-gpu cannot run there; the provider really used is recorded); int8 always on the
    CPU, whose kernels it is made for (the CUDA provider does not run QDQ int8 convolutions natively)."""
    return "auto" if device.startswith("cuda") and not variant.startswith("int8") else "cpu"


def evaluate_variants(paths: dict[str, Path], batches: Batches, *, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """One pass over the validation batches through every file: accuracy of each, and top-1
    agreement and max |logit difference| of each against ``paths['fp32']``; ``device`` is the
    run's training device (see :func:`evaluation_provider`)."""
    models = {p: OrtModel(path, SessionSettings(evaluation_provider(p, device), threads=None, spinning=False))
              for p, path in paths.items()}
    correct = {p: 0 for p in paths}
    agree = {p: 0 for p in paths}
    max_diff = {p: 0.0 for p in paths}
    seen = 0
    for images, labels in batches:
        x = images.numpy().astype(np.float32)
        y = labels.numpy()
        reference = models["fp32"].predict(x)
        for precision, model in models.items():
            logits = reference if precision == "fp32" else model.predict(x)
            correct[precision] += int((logits.argmax(1) == y).sum())
            agree[precision] += int((logits.argmax(1) == reference.argmax(1)).sum())
            max_diff[precision] = max(max_diff[precision], float(np.abs(logits - reference).max()))
        seen += len(y)
    if seen == 0:
        raise UsageError("the validation split is empty: nothing to measure the variants on")
    return {p: {"accuracy": correct[p] / seen, "top1_agreement": agree[p] / seen, "max_abs_diff": max_diff[p],
                "images": seen, "measured_on": models[p].provider} for p in paths}


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """A shallow copy of a dataset (or a ``Subset`` of one) that applies ``transform``."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        raise TypeError(f"{type(dataset).__name__} has no transform to replace")
    view = copy.copy(dataset)
    view.transform = transform
    return view


def calibration_images(data: DataBundle, settings: quantize.Int8Settings) -> np.ndarray:
    """Training images (seeded, class-stratified) through the evaluation transform, as float32 NCHW."""
    indices = quantize.stratified_indices(data.train_labels, settings.calibration_images, settings.seed)
    if not indices:
        raise UsageError("no calibration images: the training split is empty")
    view = Subset(with_transform(data.train, data.preprocessing.eval_transform()), indices)
    loader = SkippingDataLoader(view, batch_size=64, shuffle=False, num_workers=0)  # an undecodable file is left out
    batches = [images.numpy() for images, _ in loader]
    if not batches:
        raise UsageError("no calibration images: none of the chosen training images could be decoded")
    return np.concatenate(batches).astype(np.float32)


MEASURED_KEYS = ("onnx", "bytes", "accuracy", "top1_agreement", "max_abs_diff", "accuracy_drop", "flagged", "images",
                 "measured_on")
INT8_SCRATCH = ".int8-candidates"


def record(run_dir: Path, path: Path, metrics: dict[str, Any], fp32_accuracy: float, max_drop: float,
           details: dict[str, Any]) -> dict[str, Any]:
    """A variant's manifest record: its file, its measured figures against fp32, ``details``."""
    drop = fp32_accuracy - metrics["accuracy"]
    return {"onnx": path.resolve().relative_to(run_dir.resolve()).as_posix(), "bytes": path.stat().st_size,
            "accuracy": metrics["accuracy"], "top1_agreement": metrics["top1_agreement"],
            "max_abs_diff": metrics["max_abs_diff"], "accuracy_drop": drop, "flagged": drop > max_drop + 1e-12,
            "images": metrics["images"], "measured_on": metrics.get("measured_on", "cpu"), **details}


def details_of(recorded: dict[str, Any]) -> dict[str, Any]:
    """What a record says beyond its measured figures (int8: format, calibration, formats tried)."""
    return {k: v for k, v in recorded.items() if k not in MEASURED_KEYS}


def quantize_candidates(fp32_path: Path, scratch: Path, calibration: np.ndarray,
                        settings: quantize.Int8Settings) -> dict[str, Path]:
    """Every candidate int8 format of ``fp32_path`` in ``scratch`` (emptied first: a killed run
    may have left candidates there)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    files = {fmt: scratch / f"{fmt}.onnx" for fmt in settings.candidates()}
    for fmt, path in files.items():
        quantize.quantize_file(fp32_path, path, calibration, fmt=fmt, method=settings.calibration_method,
                               reduce_range=settings.reduce_range)
    return files


def keep_int8(fp32_path: Path, folder: Path, candidates: dict[str, Path], metrics: dict[str, dict[str, Any]],
              fp32_accuracy: float, settings: quantize.Int8Settings, calibration_images: int,
              probe: np.ndarray, *, max_seconds: float = 6.0) -> tuple[Path, str, dict[str, Any]]:
    """Choose among the measured candidates (with several, each is timed at batch 1 on ``probe``
    interleaved with fp32, ORT CPU, spinning off, and the fastest within the drop wins) and keep
    the chosen one as ``model_int8.onnx``. Returns its path, its format and the manifest details."""
    latency: dict[str, float] = {}
    if len(candidates) > 1:
        runners = {name: OrtModel(path, SessionSettings("cpu", spinning=False)).timed_call(probe[:1])
                   for name, path in {"fp32": fp32_path, **candidates}.items()}
        latency = quantize.time_formats(runners, max_seconds=max_seconds)
    fp32_ms = latency.get("fp32")
    tried = {fmt: {"accuracy": metrics[fmt]["accuracy"], "top1_agreement": metrics[fmt]["top1_agreement"],
                   "p50_ms": latency.get(fmt), "speedup_vs_fp32": (fp32_ms / latency[fmt]) if fmt in latency else None}
             for fmt in candidates}
    chosen = quantize.pick_format(tried, fp32_accuracy, settings.max_accuracy_drop)[0] if latency else next(iter(candidates))
    target = folder / VARIANT_FILES["int8"]
    shutil.move(str(candidates[chosen]), str(target))
    details = {"format": chosen, "format_choice": settings.int8_format,
               "calibration": settings.calibration_record(calibration_images),
               "formats_tried": tried if latency else None,
               "timing": {"batch": 1, "backend": "ort-cpu", "intra_op_threads": "ort default",
                          "intra_op_spinning": False, "fp32_p50_ms": fp32_ms} if latency else None}
    return target, chosen, details


# Intra-op thread counts tried per variant: 1, and 0 = ONNX Runtime's default (one per physical core).
THREAD_CANDIDATES = (1, 0)


def choose_threads(paths: dict[str, Path], images: np.ndarray, batches: Sequence[int], *,
                   max_seconds: float = 6.0, timer: Timer | None = None) -> dict[str, dict[str, Any]]:
    """Per variant, the intra-op thread count that ran it fastest on this CPU at each batch size.

    Why per variant and per batch: a model of a few hundred microseconds spends more on waking a
    second thread for every operator than it gains from it, a large one or a large batch gains
    (digits demo, spinning off: step 3 int8 at batch 1 ran 0.43 ms with 1 thread and 0.53 ms with
    2, step 0 fp32 2.46 and 2.02 ms; at batch 32 two threads won for every model). Every variant
    is timed with every candidate, interleaved (spinning off, as the service and ``bench models``
    run sessions), one group per batch size. Returns ``{precision: {"backend", "intra_op_spinning",
    "by_batch": {"1": {"threads": 1, "p50_ms": {"1": ms, "0": ms}}, ...}}}``, threads 0 meaning
    ORT's default; ``bench models`` and the closing report use it where no ``--threads`` is forced."""
    from .latency import batch_of

    chosen: dict[str, dict[str, Any]] = {p: {"backend": "ort-cpu", "intra_op_spinning": False, "by_batch": {}}
                                         for p in paths}
    for batch in batches:
        fixed = batch_of(images, batch)
        runners = {(p, t): OrtModel(path, SessionSettings("cpu", threads=t or None, spinning=False)).timed_call(fixed)
                   for p, path in paths.items() for t in THREAD_CANDIDATES}
        p50 = quantize.time_formats(runners, max_seconds=max_seconds, timer=timer)
        for precision in paths:
            times = {str(t): p50[(precision, t)] for t in THREAD_CANDIDATES}
            best = min(THREAD_CANDIDATES, key=lambda t: p50[(precision, t)])
            chosen[precision]["by_batch"][str(batch)] = {"threads": best, "p50_ms": times}
    return chosen


def build_fp16(fp32_path: Path, folder: Path) -> Path:
    target = folder / VARIANT_FILES["fp16"]
    onnx_export.export_fp16(fp32_path, target)
    return target

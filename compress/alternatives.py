"""The report's "Against the alternatives": our models beside what a user would run instead.

A user choosing this tool is choosing it over "keep the model, run it on a faster runtime". So
the closing report times, in one interleaved run at batch 1 and the latency batch, on the same
inputs and the same intra-op threads:

- step 0 fp32 on ONNX Runtime (the baseline of every speed-up),
- step 0 int8 on OpenVINO: what a user gets with no pruning (a QDQ int8 twin of step 0, made with
  onnxruntime.quantization and calibrated like our int8, when step 0 has no QDQ int8 file),
- the recommended step on ONNX Runtime and on OpenVINO (an int8 recommendation in QOperator format,
  which OpenVINO cannot read, runs there as its QDQ twin),

each with its accuracy through that runtime on the whole validation split, and says which is
fastest within the accuracy budget. Twins live in ``RUN_DIR/alternatives/`` and are kept for the
next report while their calibration settings stay the same. Without OpenVINO the section says so."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .backends import BackendUnavailable, Prepared, prepare
from .latency import accuracy_of, batch_of, load_run_data, threads_for, validation_arrays
from .manifest import RunManifest, StepRecord
from .quantize import Int8Settings
from .render import RECOMMEND_WITHIN
from .rundir import atomic_write_json
from .runtime.timing import compare_interleaved

FOLDER = "alternatives"
TWIN_FORMAT = "qdq-u8s8"  # OpenVINO's int8 kernels take uint8 activations and int8 weights
RUNTIME_NAMES = {"ort-cpu": "ONNX Runtime", "openvino": "OpenVINO"}


@dataclass(frozen=True)
class Candidate:
    """One (model file, runtime) of the comparison."""

    label: str
    role: str
    backend: str
    step: int
    precision: str
    path: Path


def _is_qdq(step: StepRecord) -> bool:
    variant = step.variants.get("int8")
    return bool(variant and str(variant.details.get("format", "")).startswith("qdq"))


def twin_path(run_dir: Path, step: int) -> Path:
    return run_dir / FOLDER / f"step_{step:02d}_int8_{TWIN_FORMAT}.onnx"


def int8_for_openvino(run_dir: Path, step: StepRecord, int8: Int8Settings, data: Any) -> Path:
    """The int8 file OpenVINO runs for ``step``: the step's own when it is QDQ, else its QDQ twin
    (made now, or kept from an earlier report made with the same settings)."""
    if _is_qdq(step):
        return step.variant_path(run_dir, "int8")
    from . import quantize
    from .variants import calibration_images

    path = twin_path(run_dir, step.step)
    fp32 = step.variant_path(run_dir, "fp32")
    made_with = {**int8.calibration_record(int8.calibration_images), "format": TWIN_FORMAT,
                 "fp32_bytes": fp32.stat().st_size, "fp32_mtime": fp32.stat().st_mtime_ns}
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file() and json.loads(record_path.read_text()) == made_with:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize.quantize_file(fp32, path, calibration_images(data, int8), fmt=TWIN_FORMAT, method=int8.calibration_method,
                           reduce_range=int8.reduce_range)
    atomic_write_json(record_path, made_with)
    return path


def candidates(run_dir: Path, steps: dict[int, StepRecord], recommended: tuple[int, str], int8: Int8Settings,
               data: Any, skipped: list[dict[str, str]]) -> list[Candidate]:
    step, precision = recommended
    out = [Candidate("step 0 fp32 on ONNX Runtime", "baseline", "ort-cpu", 0, "fp32", steps[0].variant_path(run_dir, "fp32"))]
    wanted = [("step 0 int8 on OpenVINO", "no pruning, int8 on OpenVINO", "openvino", 0, "int8")]
    if recommended != (0, "fp32"):
        wanted.append((f"step {step} {precision} on ONNX Runtime", "recommended, ONNX Runtime", "ort-cpu", step, precision))
    wanted.append((f"step {step} {precision} on OpenVINO", "recommended, OpenVINO", "openvino", step, precision))
    for label, role, backend, k, p in wanted:
        try:
            path = (int8_for_openvino(run_dir, steps[k], int8, data) if backend == "openvino" and p == "int8"
                    else steps[k].variant_path(run_dir, p))
        except Exception as exc:  # a twin that cannot be made is a gap in the table, said plainly
            skipped.append({"label": label, "reason": f"no QDQ int8 twin of step {k}: {exc}"})
            continue
        if path != steps[k].variant_path(run_dir, p):
            label += f" (QDQ twin: {path.relative_to(run_dir).as_posix()})"
        same = next((i for i, c in enumerate(out) if (c.backend, c.path) == (backend, path)), None)
        if same is not None:  # the recommended model is step 0 int8: one row with both roles, timed once
            out[same] = replace(out[same], role=f"{out[same].role}; {role}")
            continue
        out.append(Candidate(label, role, backend, k, p, path))
    return out


def _prepare(run_dir: Path, found: list[Candidate], steps: dict[int, StepRecord], batch: int,
             skipped: list[dict[str, str]], cache: dict[tuple[str, int | None], Prepared]) -> dict[Candidate, Prepared]:
    """Each candidate loaded with the threads ORT CPU runs that (step, precision) with at ``batch``;
    one that cannot load (OpenVINO absent, a file it cannot read) is skipped with the reason."""
    prepared: dict[Candidate, Prepared] = {}
    for item in found:
        threads = threads_for(item.backend, steps[item.step], item.precision, batch, None)
        key = (f"{item.backend}:{item.path}", threads)
        try:
            if key not in cache:
                cache[key] = prepare(item.backend, onnx_path=item.path, checkpoint=None, threads=threads)
        except BackendUnavailable as exc:
            if not any(s["label"] == item.label for s in skipped):
                skipped.append({"label": item.label, "reason": str(exc)})
            continue
        prepared[item] = cache[key]
    return prepared


def _accuracy(item: Candidate, step: StepRecord, model: Prepared, images: Any, labels: Any) -> float:
    """Top-1 on the whole validation split through the candidate's runtime: for our own files on
    ONNX Runtime the manifest already has it (measured so when the variant was built), OpenVINO's
    is measured here (its kernels, and its bf16, may move it)."""
    variant = step.variants.get(item.precision)
    if item.backend == "ort-cpu" and variant is not None and variant.accuracy is not None:  # ORT runs our files only
        return variant.accuracy
    return accuracy_of(model.predict, images, labels)


def measure_alternatives(run_dir: Path, manifest: dict[str, Any], recommended: tuple[int, str], *, batches: list[int],
                         int8: Int8Settings, data: Any = None, timing_seconds: float = 2.0) -> dict[str, Any]:
    """The section's document (``report.json``'s ``alternatives``)."""
    from .runtime.openvino_models import openvino_unavailable_reason, openvino_version

    reason = openvino_unavailable_reason()
    if reason:
        return {"available": False, "reason": reason}
    run_dir = Path(run_dir)
    steps = {s.step: s for s in RunManifest.from_dict(manifest).steps}
    skipped: list[dict[str, str]] = []
    data = load_run_data(manifest) if data is None else data
    found = candidates(run_dir, steps, recommended, int8, data, skipped)
    images, labels = validation_arrays(manifest, data=data)
    cache: dict[tuple[str, int | None], Prepared] = {}
    accuracy: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for batch in batches:
        prepared = _prepare(run_dir, found, steps, batch, skipped, cache)
        for item, model in prepared.items():
            if item.label not in accuracy:
                accuracy[item.label] = _accuracy(item, steps[item.step], model, images, labels)
        fixed = batch_of(images, batch)
        # at most 5 x --timing-seconds per batch size (10 s by default: 20 rounds of the demo's models fit)
        measured = compare_interleaved({item.label: model.make_timed(fixed) for item, model in prepared.items()},
                                       batch, found[0].label, rounds=20, min_seconds=timing_seconds,
                                       max_seconds=5 * timing_seconds)
        for item, model in prepared.items():
            rows.append({"label": item.label, "role": item.role, "backend": item.backend,
                         "runtime": RUNTIME_NAMES[item.backend], "step": item.step, "precision": item.precision,
                         "file": item.path.relative_to(run_dir).as_posix(), "batch": batch, "device": model.device,
                         "session": model.info.get("session"), "accuracy": accuracy[item.label],
                         **measured[item.label]})
    baseline_accuracy = accuracy.get(found[0].label)
    fastest = {}
    for batch in batches:
        within = [r for r in rows if r["batch"] == batch and baseline_accuracy is not None
                  and r["accuracy"] >= baseline_accuracy - RECOMMEND_WITHIN - 1e-12]
        if within:
            best = min(within, key=lambda r: r["latency"]["p50_ms"])
            fastest[str(batch)] = {"label": best["label"], "p50_ms": best["latency"]["p50_ms"], "speedup": best["speedup"]}
    return {"available": True, "openvino": openvino_version(), "batches": batches, "budget": RECOMMEND_WITHIN,
            "baseline_accuracy": baseline_accuracy, "rows": rows, "skipped": skipped, "fastest": fastest}


def sentence(section: dict[str, Any]) -> str:
    """The one sentence naming the fastest within the accuracy budget at each batch size."""
    if not section.get("fastest"):
        return "Nothing measured stayed within the accuracy budget."
    parts = [f"at batch {batch} it is {best['label']} ({best['p50_ms']:.3f} ms median, "
             f"{best['speedup']:.2f}x step 0 fp32 on ONNX Runtime)" for batch, best in section["fastest"].items()]
    return (f"Fastest within {section['budget'] * 100:.0f} point of step 0 fp32's accuracy "
            f"({section['baseline_accuracy']:.4f}): " + "; ".join(parts) + ".")


def _runs_on(row: dict[str, Any]) -> str:
    session = row.get("session") or {}
    threads = session.get("intra_op_threads")
    if row["backend"] == "openvino":
        return (f"OpenVINO {session.get('openvino')} CPU, {session.get('inference_precision')} inference, "
                f"{_threads(threads)}, {session.get('performance_hint', '').lower()} hint, {session.get('num_streams')} stream")
    spinning = "on" if session.get("intra_op_spinning") else "off"
    return f"{row['device']}, {_threads(threads)}, spinning {spinning}"


def _threads(count: Any) -> str:
    return f"{count} thread{'' if count == 1 else 's'}" if isinstance(count, int) else f"threads: {count}"


def markdown(section: dict[str, Any]) -> str:
    """The report's section, Markdown."""
    if not section.get("available"):
        return (f"Not measured: {section.get('reason')}. Install OpenVINO and run `compress report RUN_DIR` "
                "to add it.\n")
    lines = [sentence(section), "",
             "All rows of one batch size timed interleaved in one process on the same inputs; each file runs with "
             "the intra-op threads ONNX Runtime CPU runs it with (recorded when its variant was built, else one per "
             "core), ONNX Runtime with intra-op spinning off, OpenVINO with its latency hint and one stream (its "
             "own thread pool; it picks the inference precision: bf16 on CPUs with AMX/AVX-512 BF16). Accuracy is "
             "top-1 through that runtime on the whole validation split.", "",
             "| batch | model | role | runs on | accuracy | p50 ms | p90 ms | img/s | vs step 0 fp32 on ORT (p10-p90 band) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        lat = row["latency"]
        low, high = row["speedup_band"]
        band = f" ({low:.2f}-{high:.2f})" if not math.isnan(low) else ""
        ratio = "1.00x (baseline)" if row["role"] == "baseline" else f"{row['speedup']:.2f}x{band}"
        lines.append(f"| {row['batch']} | {row['label']} | {row['role']} | {_runs_on(row)} | {row['accuracy']:.4f} | "
                     f"{lat['p50_ms']:.3f} | {lat['p90_ms']:.3f} | {lat['throughput']:.0f} | {ratio} |")
    if section["skipped"]:
        lines += ["", "Not measured (nothing is reported in their place):", ""]
        lines += [f"- {s['label']}: {s['reason']}" for s in section["skipped"]]
    return "\n".join(lines) + "\n"

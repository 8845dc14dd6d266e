"""The closing report of ``compress run``: ONNX Runtime CPU latency of every step and precision
at batch 1 and a larger batch, timed interleaved in one run, written as ``RUN_DIR/report.md``,
``RUN_DIR/report.json`` and ``RUN_DIR/pareto.png`` (one accuracy-vs-latency plane, every
(step, precision) a point), and the recommended model against the alternatives: step 0 and the
recommended step on ONNX Runtime and OpenVINO, timed together (``compress.alternatives``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import alternatives
from .latency import benchmark_run
from .manifest import manifest_arch
from .quantize import Int8Settings
from .render import (RECOMMEND_WITHIN, latency_table, machine_markdown, noisy_note, plot_pareto, recommend, select,
                     steps_table, variants_table)
from .rundir import atomic_write_json, atomic_write_text


def _headline(doc: dict[str, Any], point: tuple[int, str], label: str) -> str:
    step, precision = point
    info = next(s for s in doc["steps"] if s["step"] == step)
    base = doc["steps"][0]
    row = select(doc["results"], step=step, precision=precision, batch=1)[0]
    accuracy = ((info.get("variants") or {}).get(precision) or {}).get("accuracy") or info["accuracy"]
    base_accuracy = ((base.get("variants") or {}).get("fp32") or {}).get("accuracy") or base["accuracy"]
    return (f"{label}: step {step} {precision} keeps {info['macs_ratio']:.1%} of step 0's MACs and "
            f"{info['params'] / base['params']:.1%} of its parameters at top-1 {accuracy:.4f} (step 0 fp32: "
            f"{base_accuracy:.4f}, {(accuracy - base_accuracy) * 100:+.2f} points); ONNX Runtime CPU batch-1 median "
            f"latency {row['latency']['p50_ms']:.3f} ms, {row.get('speedup', float('nan')):.2f}x faster than step 0 fp32.")


def write_run_report(run_dir: Path, manifest: dict[str, Any], *, latency_batch: int = 32,
                     data: Any = None, timing_seconds: float = 2.0, int8: Int8Settings | None = None) -> dict[str, Any]:
    """``int8``: the run's int8 settings (calibration of the QDQ twins OpenVINO runs)."""
    run_dir = Path(run_dir)
    batches = sorted({1, latency_batch})
    doc = benchmark_run(run_dir, backends=("ort-cpu",), batch_sizes=batches, measure_accuracy=False, data=data,
                        rounds=20, min_seconds=timing_seconds, max_seconds=10 * timing_seconds)
    recommended = recommend(doc, "ort-cpu", 1) or (0, "fp32")
    doc["alternatives"] = alternatives.measure_alternatives(run_dir, manifest, recommended, batches=batches,
                                                            int8=int8 or Int8Settings(), data=data,
                                                            timing_seconds=timing_seconds)
    atomic_write_json(run_dir / "report.json", doc)
    plot_pareto(doc, run_dir / "pareto.png", backend="ort-cpu", batch=1)
    last = max(s["step"] for s in doc["steps"])
    summary: dict[str, Any] = {"recommended_step": recommended[0], "recommended_precision": recommended[1],
                               "latency_backend": "ort-cpu", "batches": batches, "report": "report.md",
                               "pareto": "pareto.png", "results": "report.json", "steps": [],
                               "alternatives": {k: doc["alternatives"].get(k) for k in ("available", "reason", "fastest")
                                                if k in doc["alternatives"]}}
    for step in doc["steps"]:
        entry: dict[str, Any] = {"step": step["step"]}
        for row in select(doc["results"], step=step["step"]):
            suffix = "" if row["precision"] == "fp32" else f"_{row['precision']}"
            entry[f"ort_cpu_b{row['batch']}{suffix}_p50_ms"] = row["latency"]["p50_ms"]
            entry[f"ort_cpu_b{row['batch']}{suffix}_speedup"] = row.get("speedup")
        summary["steps"].append(entry)
    lines = [_headline(doc, (last, "fp32"), "Last step")]
    fastest_last = min(select(doc["results"], step=last, batch=1), key=lambda r: r["latency"]["p50_ms"])
    if fastest_last["precision"] != "fp32":
        lines.append(_headline(doc, (last, fastest_last["precision"]), "Fastest variant of the last step"))
    precisions = sorted({r["precision"] for r in doc["results"]}, key=["fp32", "fp16", "int8"].index)
    text = "\n".join([
        f"# Compression report: {manifest_arch(manifest)} on {manifest['dataset']['source']}",
        "",
        "\n\n".join(lines),
        "",
        f"Recommended (fastest at batch 1 within {RECOMMEND_WITHIN * 100:.0f} point of step 0 fp32's accuracy, never a "
        f"flagged variant): **step {recommended[0]} {recommended[1]}**",
        "",
        "![accuracy vs latency](pareto.png)",
        "",
        "## Steps",
        "",
        steps_table(doc),
        "## Precision variants",
        "",
        f"Precisions: {', '.join(precisions)}. Accuracy through ONNX Runtime on the whole validation split; a variant "
        "that lost more than the allowed drop against its step's fp32 is flagged, kept and never recommended.",
        "",
        variants_table(doc),
        "## ONNX Runtime CPU latency",
        "",
        latency_table(doc),
        noisy_note(),
        "## Against the alternatives",
        "",
        "What a user would run instead of compressing: step 0 as it is on OpenVINO (int8, no pruning) beside the "
        "recommended step on ONNX Runtime and on OpenVINO.",
        "",
        alternatives.markdown(doc["alternatives"]),
        "## Machine",
        "",
        machine_markdown(doc["machine"]),
        "## Run",
        "",
        f"- command: `{manifest.get('command', '')}`",
        f"- data: {manifest['dataset']['train']} train / {manifest['dataset']['val']} val images, "
        f"{len(manifest['dataset']['classes'])} classes, {len(manifest['dataset']['skipped_files'])} files skipped",
        f"- input size: {manifest['preprocessing']['input_size']} px; pruning: {manifest['config']['prune_steps']} steps "
        f"to {manifest['config']['target_macs']:.0%} of MACs, scope {manifest['config']['scope']}, "
        f"round to {manifest['config']['round_to']}",
        f"- full results: `report.json`; deeper benchmarks: `bench models {run_dir}`",
        "",
    ])
    atomic_write_text(run_dir / "report.md", text)
    return summary

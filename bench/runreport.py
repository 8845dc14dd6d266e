"""The closing report of ``compress run``: ORT CPU latency of every step at batch 1 and a
larger batch, measured interleaved in one run, written as ``RUN_DIR/report.md``,
``RUN_DIR/report.json`` and ``RUN_DIR/pareto.png``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.rundir import atomic_write_json, atomic_write_text

from .models_bench import benchmark_run
from .report import latency_table, machine_markdown, noisy_note, plot_pareto, recommend_step, select, steps_table


def write_run_report(run_dir: Path, manifest: dict[str, Any], *, latency_batch: int = 32,
                     data: Any = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    batches = sorted({1, latency_batch})
    doc = benchmark_run(run_dir, backends=("ort-cpu",), batch_sizes=batches, measure_accuracy=False, data=data,
                        rounds=20, min_seconds=2.0, max_seconds=20.0)
    atomic_write_json(run_dir / "report.json", doc)
    plot_pareto(doc, run_dir / "pareto.png", backend="ort-cpu", batch=1)
    recommended = recommend_step(doc, "ort-cpu", 1)
    last = max(s["step"] for s in doc["steps"])
    summary: dict[str, Any] = {"recommended_step": recommended, "latency_backend": "ort-cpu", "batches": batches,
                               "report": "report.md", "pareto": "pareto.png", "results": "report.json", "steps": []}
    for step in doc["steps"]:
        entry: dict[str, Any] = {"step": step["step"]}
        for row in select(doc["results"], step=step["step"], precision="fp32"):
            entry[f"ort_cpu_b{row['batch']}_p50_ms"] = row["latency"]["p50_ms"]
            entry[f"ort_cpu_b{row['batch']}_speedup"] = row.get("speedup")
        summary["steps"].append(entry)
    base_acc = doc["steps"][0]["accuracy"]
    last_row = next(s for s in doc["steps"] if s["step"] == last)
    last_b1 = select(doc["results"], step=last, batch=1, precision="fp32")[0]
    headline = (f"Step {last} keeps {last_row['macs_ratio']:.1%} of step 0's MACs and {last_row['params'] / doc['steps'][0]['params']:.1%} "
                f"of its parameters at top-1 {last_row['accuracy']:.4f} (step 0: {base_acc:.4f}, "
                f"{(last_row['accuracy'] - base_acc) * 100:+.2f} points); ONNX Runtime CPU batch-1 median latency "
                f"{last_b1['latency']['p50_ms']:.3f} ms, {last_b1.get('speedup', float('nan')):.2f}x faster than step 0.")
    text = "\n".join([
        f"# Compression report: {manifest['config']['arch']} on {manifest['dataset']['source']}",
        "",
        headline,
        "",
        f"Recommended step (fastest at batch 1 within {1} point of step 0's accuracy): **{recommended}**",
        "",
        "![accuracy vs latency](pareto.png)",
        "",
        "## Steps",
        "",
        steps_table(doc),
        "## ONNX Runtime CPU latency",
        "",
        latency_table(doc),
        noisy_note(),
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

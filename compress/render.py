"""Markdown tables and PNG plots of latency results (``latency.benchmark_run`` documents),
shared by ``compress run``'s closing report and ``bench models``.

Every (step, precision) is one point on one accuracy-vs-latency plane; the recommended model
is the fastest point within 1 point of step 0 fp32's accuracy, never a flagged variant."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import atomic_write_with  # noqa: E402
from .runtime.timing import FEW_SAMPLES, NOISY_SPREAD  # noqa: E402

RECOMMEND_WITHIN = 0.01  # the recommended model: the fastest within 1 point of step 0 fp32's accuracy
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "D"}


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of points not dominated by another (lower-or-equal latency and higher-or-equal
    accuracy, one of them strictly)."""
    front = set()
    for i, (lat_i, acc_i) in enumerate(points):
        dominated = any((lat_j <= lat_i and acc_j >= acc_i) and (lat_j < lat_i or acc_j > acc_i)
                        for j, (lat_j, acc_j) in enumerate(points) if j != i)
        if not dominated:
            front.add(i)
    return front


def select(results: Iterable[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in results if all(r.get(k) == v for k, v in match.items())]


def _variant(doc: dict[str, Any], step: int, precision: str) -> dict[str, Any]:
    info = next(s for s in doc["steps"] if s["step"] == step)
    return (info.get("variants") or {}).get(precision) or {}


def accuracy_of_point(doc: dict[str, Any], step: int, precision: str = "fp32", backend: str | None = None) -> float:
    """Accuracy measured through ``backend`` when the document has it, else the variant's
    accuracy from the manifest (ONNX Runtime, whole validation split), else the step's."""
    if backend:
        measured = [r["accuracy"] for r in select(doc["results"], step=step, precision=precision, backend=backend)
                    if r.get("accuracy") is not None]
        if measured:
            return measured[0]
    variant = _variant(doc, step, precision)
    if variant.get("accuracy") is not None:
        return variant["accuracy"]
    return next(s["accuracy"] for s in doc["steps"] if s["step"] == step)


def flagged(doc: dict[str, Any], step: int, precision: str) -> bool:
    """A variant that lost more than the allowed accuracy drop against its step's fp32."""
    return bool(_variant(doc, step, precision).get("flagged"))


def recommend(doc: dict[str, Any], backend: str, batch: int) -> tuple[int, str] | None:
    """The fastest (step, precision) by median latency whose accuracy is within 1 point of
    step 0 fp32's, flagged variants excluded; None when nothing was measured."""
    rows = select(doc["results"], backend=backend, batch=batch)
    if not rows:
        return None
    base = accuracy_of_point(doc, 0, "fp32", backend)
    good = [r for r in rows if not flagged(doc, r["step"], r["precision"])
            and accuracy_of_point(doc, r["step"], r["precision"], backend) >= base - RECOMMEND_WITHIN - 1e-12]
    if not good:
        return (0, "fp32")
    best = min(good, key=lambda r: r["latency"]["p50_ms"])
    return best["step"], best["precision"]


def plot_pareto(doc: dict[str, Any], path: Path, *, backend: str, batch: int) -> None:
    """Accuracy vs median latency, one point per (step, precision), the Pareto front in red,
    flagged variants crossed out."""
    rows = sorted(select(doc["results"], backend=backend, batch=batch), key=lambda r: (r["precision"], r["step"]))
    points = [(r["latency"]["p50_ms"], accuracy_of_point(doc, r["step"], r["precision"], backend)) for r in rows]
    front = pareto_front(points)
    macs = {s["step"]: s["macs_ratio"] for s in doc["steps"]}

    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=110)
        for precision in sorted({r["precision"] for r in rows}):
            line = [(points[i][0], points[i][1] * 100) for i, r in enumerate(rows) if r["precision"] == precision]
            line.sort()
            ax.plot([p[0] for p in line], [p[1] for p in line], color="0.8", zorder=1)
        for i, row in enumerate(rows):
            x, y = points[i][0], points[i][1] * 100
            on_front = i in front
            marker = PRECISION_MARKERS.get(row["precision"], "o")
            ax.scatter(x, y, s=70 if on_front else 40, zorder=2, marker=marker,
                       color="tab:red" if on_front else "tab:blue", edgecolor="black" if on_front else "none")
            if flagged(doc, row["step"], row["precision"]):
                ax.scatter(x, y, s=120, marker="x", color="black", zorder=3)
            ax.annotate(f"{row['step']} {row['precision']}\n{macs[row['step']]:.0%} MACs", (x, y),
                        textcoords="offset points", xytext=(6, 4), fontsize=7)
        handles = [plt.Line2D([], [], marker=PRECISION_MARKERS.get(p, "o"), linestyle="", color="tab:blue", label=p)
                   for p in sorted({r["precision"] for r in rows})]
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="lower right")
        ax.margins(x=0.15, y=0.2)  # room for the labels at the edges
        ax.set_xlabel(f"median latency, ms ({backend}, batch {batch})")
        ax.set_ylabel("top-1 accuracy, %")
        ax.set_title("Accuracy vs latency per step and precision (red: Pareto front; x: flagged)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def fmt_speedup(row: dict[str, Any]) -> str:
    if "speedup" not in row:
        return "-"
    if row["step"] == 0 and row.get("precision", "fp32") == "fp32":
        return "1.00x (baseline)"
    low, high = row.get("speedup_band", [None, None])
    band = f" ({low:.2f}-{high:.2f})" if low is not None and not math.isnan(low) else ""
    return f"{row['speedup']:.2f}x{band}"


def machine_markdown(machine: dict[str, Any]) -> str:
    gpu = machine.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gib']} GiB, driver {gpu.get('driver')}, CUDA {gpu.get('cuda')})" if gpu else "none"
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    load = machine.get("load_average")
    load_text = f"- Load average at start (1, 5, 15 min): {', '.join(map(str, load))}\n" if load else ""
    return (f"- CPU: {machine['cpu']}, {machine['usable_cores']} usable cores, threads: {machine.get('threads') or 'library default'}\n"
            f"- GPU: {gpu_text}\n- OS: {machine['os']}, host {machine.get('hostname', '?')}\n{load_text}- Versions: {versions}\n")


def _notes(row: dict[str, Any]) -> str:
    lat, notes = row["latency"], []
    if lat["noisy"]:
        notes.append(f"noisy (spread {lat['spread']:.0%})")
    if row.get("speedup_noisy"):
        notes.append("unstable speed-up")
    if lat["samples"] < FEW_SAMPLES:
        notes.append(f"few samples ({lat['samples']})")
    return "; ".join(notes)


def latency_table(doc: dict[str, Any], rows: Sequence[dict[str, Any]] | None = None) -> str:
    """One row per (backend, batch, step, precision) with percentiles, throughput, speed-up."""
    lines = ["| backend | batch | step | precision | runs on | accuracy | p50 ms | p90 ms | p95 ms | p99 ms | mean ms | img/s | speed-up vs step 0 fp32 (p10-p90 band) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = doc["results"] if rows is None else rows
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    for row in sorted(rows, key=lambda r: (r["backend"], r["batch"], r["step"], order.get(r["precision"], 9))):
        lat = row["latency"]
        acc = accuracy_of_point(doc, row["step"], row["precision"], row["backend"])
        note = _notes(row)
        if flagged(doc, row["step"], row["precision"]):
            note = "; ".join(filter(None, ["flagged: accuracy drop over the limit", note]))
        threads = row.get("intra_op_threads")
        runs_on = row["device"] + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
        lines.append(f"| {row['backend']} | {row['batch']} | {row['step']} | {row['precision']} | {runs_on} | {acc:.4f} | "
                     f"{lat['p50_ms']:.3f} | {lat['p90_ms']:.3f} | {lat['p95_ms']:.3f} | {lat['p99_ms']:.3f} | "
                     f"{lat['mean_ms']:.3f} | {lat['throughput']:.0f} | {fmt_speedup(row)} | {note} |")
    return "\n".join(lines) + "\n"


def steps_table(doc: dict[str, Any]) -> str:
    lines = ["| step | MACs | of step 0 | params | ONNX MB | accuracy (PyTorch) | parity max abs diff | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for s in doc["steps"]:
        parity = s.get("parity") or {}
        onnx_mb = f"{s['onnx_bytes'] / 1e6:.2f}" if s.get("onnx_bytes") else "-"
        lines.append(f"| {s['step']} | {s['macs']:,} | {s['macs_ratio']:.1%} | {s['params']:,} | {onnx_mb} | "
                     f"{s['accuracy']:.4f} | {parity.get('max_abs_diff', float('nan')):.2e} | "
                     f"{parity.get('top1_agreement', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def variants_table(doc: dict[str, Any]) -> str:
    """Per (step, precision): file size, accuracy through ONNX Runtime, agreement with the
    step's fp32, and for int8 the format chosen and how it was calibrated."""
    lines = ["| step | precision | MB | accuracy (ORT, whole val split) | drop vs fp32 (points) | top-1 agreement with fp32 "
             "| max abs logit diff | int8 format / calibration | flagged |", "|---|---|---|---|---|---|---|---|---|"]
    for s in doc["steps"]:
        for precision, v in (s.get("variants") or {}).items():
            size = f"{v['bytes'] / 1e6:.2f}" if v.get("bytes") else "-"
            acc = f"{v['accuracy']:.4f}" if v.get("accuracy") is not None else "-"
            drop = f"{v['accuracy_drop'] * 100:+.2f}" if v.get("accuracy_drop") is not None else "-"
            agree = f"{v['top1_agreement']:.4f}" if v.get("top1_agreement") is not None else "-"
            diff = f"{v['max_abs_diff']:.2e}" if v.get("max_abs_diff") is not None else "-"
            calib = v.get("calibration") or {}
            how = f"{v.get('format')}, {calib.get('method')}, {calib.get('images')} images" if v.get("format") else "-"
            if v.get("format") and calib.get("reduce_range"):
                how += f", 7-bit weights: {calib['reduce_range']}"
            lines.append(f"| {s['step']} | {precision} | {size} | {acc} | {drop} | {agree} | {diff} | {how} | "
                         f"{'yes' if v.get('flagged') else ''} |")
    return "\n".join(lines) + "\n"


def noisy_note() -> str:
    return (f"Latency is timed after warm-up, all models interleaved (A, B, A, B, ...) in one process; the speed-up band is "
            f"the 10th-90th percentile of per-round ratios. Rows marked noisy have (p90 - p10) / p50 > {NOISY_SPREAD:.0%}. "
            "ONNX Runtime sessions run with intra-op thread spinning off, as the service runs them (idle threads "
            "sleep instead of busy-waiting; interleaved sessions would otherwise steal each other's cores): on CPU "
            "this adds a wake-up cost per operator, which weighs most on the smallest models. Unless `--threads` "
            "is given, each model runs with the intra-op thread count measured fastest for it at that batch size "
            "when its variant was built (\"runs on\" says which; \"ort default\" is one per physical core), so a "
            "speed-up compares each model at its own setting.\n")

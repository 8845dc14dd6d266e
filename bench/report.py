"""Reports of ``bench models`` results: Markdown tables and PNG plots.

The same functions write ``compress run``'s closing report (``RUN_DIR/report.md`` and
``RUN_DIR/pareto.png``) and the deeper ``bench models`` report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.rundir import atomic_write_json, atomic_write_text, atomic_write_with  # noqa: E402

from .measure import NOISY_SPREAD  # noqa: E402

RECOMMEND_WITHIN = 0.01  # recommended step: the fastest one within 1 point of step 0's accuracy


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


def step_accuracy(doc: dict[str, Any], step: int, backend: str | None = None) -> float:
    """Accuracy measured through ``backend`` when available, else the manifest's."""
    if backend:
        measured = [r["accuracy"] for r in select(doc["results"], step=step, backend=backend) if r.get("accuracy") is not None]
        if measured:
            return measured[0]
    return next(s["accuracy"] for s in doc["steps"] if s["step"] == step)


def recommend_step(doc: dict[str, Any], backend: str, batch: int, precision: str = "fp32") -> int | None:
    """The fastest step (by median latency) whose accuracy is within 1 point of step 0's."""
    rows = select(doc["results"], backend=backend, batch=batch, precision=precision)
    if not rows:
        return None
    base = step_accuracy(doc, 0, backend)
    good = [r for r in rows if step_accuracy(doc, r["step"], backend) >= base - RECOMMEND_WITHIN]
    return min(good, key=lambda r: r["latency"]["p50_ms"])["step"] if good else 0


def plot_pareto(doc: dict[str, Any], path: Path, *, backend: str, batch: int, precision: str = "fp32") -> None:
    """Accuracy vs median latency, one point per step, Pareto-optimal steps marked."""
    rows = sorted(select(doc["results"], backend=backend, batch=batch, precision=precision), key=lambda r: r["step"])
    points = [(r["latency"]["p50_ms"], step_accuracy(doc, r["step"], backend)) for r in rows]
    front = pareto_front(points)

    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        xs, ys = [p[0] for p in points], [p[1] * 100 for p in points]
        ax.plot(xs, ys, color="0.75", zorder=1)
        for i, row in enumerate(rows):
            on_front = i in front
            ax.scatter(xs[i], ys[i], s=70 if on_front else 40, zorder=2, color="tab:red" if on_front else "tab:blue",
                       edgecolor="black" if on_front else "none")
            macs = next(s["macs_ratio"] for s in doc["steps"] if s["step"] == row["step"])
            ax.annotate(f"step {row['step']}\n{macs:.0%} MACs", (xs[i], ys[i]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_xlabel(f"median latency, ms ({backend}, {precision}, batch {batch})")
        ax.set_ylabel("top-1 accuracy, %")
        ax.set_title("Accuracy vs latency (red: Pareto-optimal)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    """Throughput vs batch size, one line per (backend, precision, step)."""
    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        keys = sorted({(r["backend"], r["precision"], r["step"]) for r in doc["results"]})
        for backend, precision, step in keys:
            rows = sorted(select(doc["results"], backend=backend, precision=precision, step=step), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["latency"]["throughput"] for r in rows], marker="o",
                    label=f"{backend} {precision} step {step}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (at median latency)")
        ax.set_title("Throughput vs batch size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def plot_speedup_vs_macs(doc: dict[str, Any], path: Path) -> None:
    """Measured speed-up against MAC reduction; the diagonal is 'speed-up = MAC reduction'."""
    macs_ratio = {s["step"]: s["macs_ratio"] for s in doc["steps"]}

    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        keys = sorted({(r["backend"], r["precision"], r["batch"]) for r in doc["results"]})
        top = 1.0
        for backend, precision, batch in keys:
            rows = sorted((r for r in select(doc["results"], backend=backend, precision=precision, batch=batch)
                           if "speedup" in r), key=lambda r: r["step"])
            xs = [1 / macs_ratio[r["step"]] for r in rows]
            ax.plot(xs, [r["speedup"] for r in rows], marker="o", label=f"{backend} {precision} b{batch}")
            top = max([top] + xs + [r["speedup"] for r in rows])
        ax.plot([1, top], [1, top], linestyle="--", color="0.5", label="speed-up = MAC reduction")
        ax.set_xlabel("MAC reduction (x fewer MACs than step 0)")
        ax.set_ylabel("measured speed-up vs step 0")
        ax.set_title("Where MACs are not latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def _fmt_speedup(row: dict[str, Any]) -> str:
    if "speedup" not in row:
        return "-"
    low, high = row.get("speedup_band", [None, None])
    band = f" ({low:.2f}-{high:.2f})" if low == low and low is not None else ""
    return f"{row['speedup']:.2f}x{band}"


def machine_markdown(machine: dict[str, Any]) -> str:
    gpu = machine.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gib']} GiB, driver {gpu.get('driver')}, CUDA {gpu.get('cuda')})" if gpu else "none"
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    return (f"- CPU: {machine['cpu']}, {machine['usable_cores']} usable cores, threads: {machine.get('threads') or 'library default'}\n"
            f"- GPU: {gpu_text}\n- OS: {machine['os']}\n- Versions: {versions}\n")


def latency_table(doc: dict[str, Any]) -> str:
    """One row per (backend, precision, batch, step) with percentiles, throughput, speed-up."""
    lines = ["| backend | precision | batch | step | runs on | accuracy | p50 ms | p90 ms | p95 ms | p99 ms | mean ms | img/s | speed-up vs step 0 (p10-p90 band) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(doc["results"], key=lambda r: (r["backend"], r["precision"], r["batch"], r["step"])):
        lat = row["latency"]
        acc = f"{row['accuracy']:.4f}" if row.get("accuracy") is not None else "-"
        note = f"noisy (spread {lat['spread']:.0%})" if lat["noisy"] else ""
        lines.append(f"| {row['backend']} | {row['precision']} | {row['batch']} | {row['step']} | {row['device']} | {acc} | "
                     f"{lat['p50_ms']:.3f} | {lat['p90_ms']:.3f} | {lat['p95_ms']:.3f} | {lat['p99_ms']:.3f} | "
                     f"{lat['mean_ms']:.3f} | {lat['throughput']:.0f} | {_fmt_speedup(row)} | {note} |")
    return "\n".join(lines) + "\n"


def steps_table(doc: dict[str, Any]) -> str:
    lines = ["| step | MACs | of step 0 | params | ONNX MB | accuracy (manifest) | parity max abs diff | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for s in doc["steps"]:
        parity = s.get("parity") or {}
        onnx_mb = f"{s['onnx_bytes'] / 1e6:.2f}" if s.get("onnx_bytes") else "-"
        lines.append(f"| {s['step']} | {s['macs']:,} | {s['macs_ratio']:.1%} | {s['params']:,} | {onnx_mb} | "
                     f"{s['accuracy']:.4f} | {parity.get('max_abs_diff', float('nan')):.2e} | "
                     f"{parity.get('top1_agreement', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def write_json(doc: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, doc)


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def noisy_note() -> str:
    return (f"Latency is timed after warm-up, steps interleaved (A, B, A, B, ...) in one process; the speed-up band is "
            f"the 10th-90th percentile of per-round ratios. Rows marked noisy have (p90 - p10) / p50 > {NOISY_SPREAD:.0%}.\n")


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)

"""Reports of ``bench models`` and ``bench serve`` results: Markdown and PNG plots. The parts
shared with ``compress run``'s closing report (Pareto plane, latency and step tables, the
recommendation) live in ``compress.render``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.render import (RECOMMEND_WITHIN, fmt_speedup, latency_table, machine_markdown, noisy_note,  # noqa: E402
                             plot_pareto, recommend, select, steps_table, variants_table)
from compress.rundir import atomic_write_json, atomic_write_text, atomic_write_with  # noqa: E402
from compress.runtime.timing import FEW_SAMPLES  # noqa: E402


def plot_throughput(doc: dict[str, Any], path: Path) -> None:
    """Throughput vs batch size: one panel per (backend, precision), one line per step, so the
    batch size where a backend saturates is visible and steps are compared on equal terms."""
    groups = sorted({(r["backend"], r["precision"]) for r in doc["results"]})

    def draw(tmp: Path) -> None:
        fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.6 * max(len(groups), 1), 4.2), dpi=110,
                                 squeeze=False, sharey=False)
        for ax, (backend, precision) in zip(axes[0], groups):
            for step in sorted({r["step"] for r in select(doc["results"], backend=backend, precision=precision)}):
                rows = sorted(select(doc["results"], backend=backend, precision=precision, step=step),
                              key=lambda r: r["batch"])
                ax.plot([r["batch"] for r in rows], [r["latency"]["throughput"] for r in rows], marker="o",
                        label=f"step {step}")
            device = next(r["device"] for r in select(doc["results"], backend=backend, precision=precision))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batches = sorted({r["batch"] for r in select(doc["results"], backend=backend, precision=precision)})
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_title(f"{backend} {precision} ({device})", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("images / s (at median latency)")
        if not groups:
            axes[0][0].text(0.5, 0.5, "no measurements", ha="center", va="center", transform=axes[0][0].transAxes)
        fig.suptitle("Throughput vs batch size")
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


# --- the full `bench models` report -------------------------------------------------------------

def _slug(*parts: Any) -> str:
    return "_".join(str(p) for p in parts).replace("/", "-").replace(" ", "-")


def _groups(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(backend, precision) pairs in the order they were measured."""
    seen: list[tuple[str, str]] = []
    for row in doc["results"]:
        key = (row["backend"], row["precision"])
        if key not in seen:
            seen.append(key)
    return seen


def busy_warning(doc: dict[str, Any]) -> str:
    """A warning when other programs loaded the machine: absolute figures are then pessimistic
    and noisy, though interleaving keeps the speed-ups meaningful."""
    machine = doc.get("machine", {})
    cores = machine.get("usable_cores") or 1
    loads = [x for x in ((machine.get("load_average") or [None])[0], (doc.get("load_average_end") or [None])[0]) if x is not None]
    if loads and max(loads) > 0.75 * cores + 0.5:
        return (f"> **Warning:** the machine was busy while measuring (1-minute load average up to {max(loads):.1f} on "
                f"{cores} cores): absolute latencies are pessimistic; speed-ups are measured interleaved and hold better.\n\n")
    return ""


def noisy_advice(doc: dict[str, Any]) -> str:
    """What to do about noisy rows, when there are any."""
    noisy = [r for r in doc["results"] if r["latency"]["noisy"] or r.get("speedup_noisy")]
    if not noisy:
        return ""
    torch_cpu = any(r["device"] == "torch:cpu" for r in noisy) and not doc["settings"].get("threads")
    return (f"{len(noisy)} of {len(doc['results'])} rows are noisy: re-run on an idle machine or with a larger "
            "--max-seconds" + ("; PyTorch on CPU uses one OpenMP thread per core, and those threads stall when other "
                               "programs share the cores: --threads 1 gives steadier figures." if torch_cpu else ".")
            + "\n")


def summary_table(doc: dict[str, Any]) -> str:
    """Per (backend, batch, precision): the last step's speed-up against step 0 fp32, and per
    (backend, batch) the recommended model."""
    last = max(s["step"] for s in doc["steps"])
    macs_ratio = {s["step"]: s["macs_ratio"] for s in doc["steps"]}
    lines = [f"| backend | batch | precision | step 0 p50 ms | step {last} p50 ms | step {last} speed-up vs step 0 fp32 "
             f"(MACs: {1 / macs_ratio[last]:.2f}x fewer) | recommended (step, precision) |", "|---|---|---|---|---|---|---|"]
    for backend, precision in _groups(doc):
        for batch in doc["settings"]["batch_sizes"]:
            rows = {r["step"]: r for r in select(doc["results"], backend=backend, precision=precision, batch=batch)}
            if 0 not in rows or last not in rows:
                continue
            best = recommend(doc, backend, batch)
            lines.append(f"| {backend} | {batch} | {precision} | {rows[0]['latency']['p50_ms']:.3f} | "
                         f"{rows[last]['latency']['p50_ms']:.3f} | {fmt_speedup(rows[last])} | "
                         f"{f'step {best[0]} {best[1]}' if best else '-'} |")
    return "\n".join(lines) + "\n"


def hints_table(doc: dict[str, Any]) -> str:
    lines = ["| step | conv layers | not multiples of 8 | layers (in -> out channels) |", "|---|---|---|---|"]
    for step in doc["steps"]:
        hints = step.get("hints") or {"convs": 0, "unaligned": []}
        names = ", ".join(f"{h['layer']} ({h['in']} -> {h['out']})" for h in hints["unaligned"]) or "none"
        lines.append(f"| {step['step']} | {hints['convs']} | {len(hints['unaligned'])} | {names} |")
    return "\n".join(lines) + "\n"


def write_models_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``results.json``, ``report.md`` and the PNG plots of one ``bench models`` run."""
    out_dir = Path(out_dir)
    files = {"results": out_dir / "results.json", "report": out_dir / "report.md"}
    atomic_write_json(files["results"], doc)
    groups = _groups(doc)
    backends = list(dict.fromkeys(b for b, _ in groups))
    first_batch = min(doc["settings"]["batch_sizes"])
    for backend in backends:
        name = f"pareto_{_slug(backend)}"
        files[name] = out_dir / f"{name}.png"
        plot_pareto(doc, files[name], backend=backend, batch=first_batch)
    if groups:
        files["throughput"] = out_dir / "throughput.png"
        plot_throughput(doc, files["throughput"])
        files["speedup_vs_macs"] = out_dir / "speedup_vs_macs.png"
        plot_speedup_vs_macs(doc, files["speedup_vs_macs"])
    source = doc.get("dataset", {}).get("source") or "its data"
    parts = [f"# Benchmark of {doc['run_dir']} ({doc.get('arch') or 'model'} on {source}, "
             f"{doc.get('input_size') or '?'} px)", "", f"Measured {doc['created']} in {doc['seconds']:.0f} s.", "",
             busy_warning(doc)]
    if doc["skipped"]:
        parts += ["Skipped (not measured, nothing is reported in their place):", ""]
        parts += [f"- {s['backend']} {s['precision']}: {s['reason']}" for s in doc["skipped"]] + [""]
    if groups:
        parts += ["## Summary", "", f"Recommended: the fastest (step, precision) within {RECOMMEND_WITHIN * 100:.0f} point "
                  "of step 0 fp32's accuracy (measured through that backend), never a flagged variant. Speed-ups are "
                  "against step 0 fp32 on the same backend and batch, timed interleaved.", "", summary_table(doc)]
        parts += [f"![accuracy vs latency, {b}](pareto_{_slug(b)}.png)" for b in backends]
        parts += ["", "![throughput vs batch size](throughput.png)", "",
                  "![measured speed-up vs MAC reduction](speedup_vs_macs.png)", ""]
    parts += ["## Steps", "", steps_table(doc), "## Precision variants", "", variants_table(doc)]
    for backend, precision in groups:
        parts += [f"## Latency: {backend} {precision}", "",
                  latency_table(doc, select(doc["results"], backend=backend, precision=precision))]
    parts += [noisy_note(), noisy_advice(doc), "", "## Hardware hints", "",
              "Conv layers whose channel counts are not multiples of 8 are tensor-core unfriendly on GPUs (cuDNN pads "
              "them or picks slower kernels); prune with `round_to=8` to avoid them. The image input's 3 channels are "
              "exempt.", "", hints_table(doc), "## Machine", "", machine_markdown(doc["machine"]), "## Settings", "",
              "- " + ", ".join(f"{k}: {v}" for k, v in doc["settings"].items()), ""]
    atomic_write_text(files["report"], "\n".join(parts))
    return files


# --- the `bench serve` report -------------------------------------------------------------------

def _errors_text(level: dict[str, Any]) -> str:
    parts = [f"{code}: {n}" for code, n in level["by_status"].items() if not code.startswith("2")]
    parts += [f"{name}: {n}" for name, n in level["connection_errors"].items()]
    return ", ".join(parts) or "none"


def serve_table(doc: dict[str, Any]) -> str:
    """One row per concurrency level: counts, rates, latency of successful answers, errors."""
    lines = ["| concurrency | requests | ok | error rate | requests/s | ok/s | p50 ms | p90 ms | p95 ms | p99 ms | mean ms "
             "| errors by status / exception | stopped by | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for level in doc["levels"]:
        lat = level["latency"]
        cells = ([f"{lat[k]:.1f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")] if lat else ["-"] * 5)
        note = []
        if lat and lat["noisy"]:
            note.append(f"spread {lat['spread']:.0%}")
        if lat and lat["samples"] < FEW_SAMPLES:
            note.append(f"few samples ({lat['samples']})")
        if (level.get("gpu") or {}).get("samples"):
            note.append(f"GPU {level['gpu']['mean_util_pct']:.0f}% mean utilisation")
        lines.append(f"| {level['concurrency']} | {level['requests']} | {level['ok']} | {level['error_rate']:.1%} | "
                     f"{level['requests_per_s']:.1f} | {level['ok_per_s']:.1f} | {' | '.join(cells)} | "
                     f"{_errors_text(level)} | {level.get('stopped_by', '-')} | {'; '.join(note)} |")
    return "\n".join(lines) + "\n"


def gpu_line(doc: dict[str, Any]) -> str:
    """How GPU utilisation was sampled (per level in the table's note), or why it was not."""
    sampler = doc.get("gpu_utilisation") or {}
    if "skipped" in sampler:
        return f"GPU utilisation: not sampled ({sampler['skipped']}).\n"
    if sampler:
        return f"GPU utilisation: `{sampler['source']}`, {sampler['samples']} samples (per level in the note).\n"
    return ""


def plot_serve(doc: dict[str, Any], path: Path) -> None:
    """Latency percentiles and requests/s against concurrency, side by side."""
    levels = doc["levels"]

    def draw(tmp: Path) -> None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
        xs = [lvl["concurrency"] for lvl in levels]
        for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
            pts = [(x, lvl["latency"][key]) for x, lvl in zip(xs, levels) if lvl["latency"]]
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        left.set_xlabel("concurrency (requests in flight)")
        left.set_ylabel("latency of successful requests, ms")
        left.set_title("Latency vs concurrency")
        right.plot(xs, [lvl["requests_per_s"] for lvl in levels], marker="o", label="all answers")
        right.plot(xs, [lvl["ok_per_s"] for lvl in levels], marker="s", label="successful (2xx)")
        right.set_xlabel("concurrency (requests in flight)")
        right.set_ylabel("requests / s")
        right.set_title("Throughput vs concurrency")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(doc["url"], fontsize=9)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def write_serve_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``results.json``, ``report.md`` and ``load.png`` of one ``bench serve`` run."""
    out_dir = Path(out_dir)
    files = {"results": out_dir / "results.json", "report": out_dir / "report.md", "plot": out_dir / "load.png"}
    atomic_write_json(files["results"], doc)
    plot_serve(doc, files["plot"])
    settings = doc["settings"]
    models = sorted({m for level in doc["levels"] for m in level.get("models", [])})
    same = ("The client ran on the same machine as the service and competed with it for the CPU (see client CPU "
            "seconds per level in results.json).\n" if doc.get("client_on_same_machine") else "")
    parts = [f"# Load test of {doc['url']}", "", f"Measured {doc['created']} in {doc['seconds']:.0f} s. Closed loop: each "
             f"of C workers sends its next request when the previous one is answered; at most {settings['requests']} "
             f"requests and {settings['duration']:g} s per level (requests in flight at the deadline are awaited), "
             f"{settings['warmup']} untimed warm-up requests, timeout {settings['timeout']:g} s. "
             f"{doc['images']['count']} image(s) ({doc['images']['bytes'] / 1e3:.0f} kB) sent in turn as multipart "
             f"field `{settings['field']}`, {settings.get('files_per_request', 1)} per request.", "", f"Model(s) answering: {', '.join(models) or 'not reported'}.", "",
             busy_warning(doc) + same, "![latency and throughput vs concurrency](load.png)", "",
             "## Results", "", "Latency percentiles are those of successful (2xx) answers, measured on the client from "
             "sending the request to reading the whole answer.", "", serve_table(doc), gpu_line(doc), "## Client machine", "",
             machine_markdown(doc["machine"])]
    if doc.get("baseline"):
        parts += ["", "## Against the same model in-process", "", baseline_table(doc)]
    atomic_write_text(files["report"], "\n".join(parts))
    return files


def baseline_table(doc: dict[str, Any]) -> str:
    """The service's throughput as a fraction of the model's in-process batch-1 throughput, and
    the server's CPU per request (all measured in the same run)."""
    base = doc["baseline"]
    lines = [f"In-process: step {base['step']} {base['precision']} of `{base['run_dir']}`, one ONNX Runtime session "
             f"({', '.join(f'{k} {v}' for k, v in base['session'].items())}): "
             + "; ".join(f"batch {b}: {v['images_per_s']:.0f} images/s (p50 {v['p50_ms']:.3f} ms)"
                         for b, v in base["batches"].items())
             + f". Service mean batch size: {base.get('service_mean_batch_size') or 'not reported'}.", "",
             "| concurrency | service ok/s | service images/s | fraction of in-process batch 1 | fraction of best "
             "in-process | server CPU ms / request | model batch | model CPU ms / image (in-process) | "
             "server CPU outside the model ms / request | client CPU ms / request |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def figure(value: float | None, form: str = ".2f") -> str:
        return "-" if value is None else format(value, form)

    for level in doc["levels"]:
        client = 1000 * level["client_cpu_s"] / level["requests"] if level.get("requests") else None
        lines.append(f"| {level['concurrency']} | {level['ok_per_s']:.1f} | {level.get('images_per_s', level['ok_per_s']):.1f} | "
                     f"{figure(level.get('fraction_of_in_process_b1'), '.0%')} | "
                     f"{figure(level.get('fraction_of_in_process_best'), '.0%')} | "
                     f"{figure(level.get('server_cpu_ms_per_request'))} | {figure(level.get('model_mean_batch'))} | "
                     f"{figure(level.get('model_cpu_ms_per_image'))} | {figure(level.get('server_cpu_ms_outside_model'))} | "
                     f"{figure(client)} |")
    return "\n".join(lines) + "\n"

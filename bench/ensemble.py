"""``bench ensemble``: a voting ensemble of (pruned) models against one single model, accuracy
and throughput side by side, measured in one process on one backend.

Accuracy: every member's logits on the whole validation split through ONNX Runtime, combined
per image by the service's own voting code (``serve.voting``: soft = mean probability, hard =
majority of labels), so the figure is what ``SERVE_MODELS=a,b,c`` would answer. Throughput: one
ensemble call runs every member on the same batch in turn (as the service does), timed
interleaved with the single model on that batch; on CUDA with IO binding, so the figures are
the models' time, not host-device copies'."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from compress.errors import UsageError
from compress.rundir import atomic_write_json, atomic_write_text, atomic_write_with

VOTINGS = ("soft", "hard")


def parse_model(text: str) -> tuple[Path, int | None]:
    """``RUN_DIR`` (its recommended step) or ``RUN_DIR:STEP``."""
    from .baseline import parse_baseline

    try:
        return parse_baseline(text)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--baseline", "model")) from None


def _load(run_dir: Path, step: int | None, precision: str) -> dict[str, Any]:
    from .baseline import step_model

    chosen = step_model(run_dir, step, precision)
    raw, manifest, record, path, step = chosen.raw, chosen.manifest, chosen.record, chosen.path, chosen.record.step
    return {"name": f"{run_dir.name}:{step}", "run_dir": str(run_dir), "step": step, "precision": precision,
            "path": path, "classes": manifest.classes, "macs": record.macs, "params": record.params,
            "manifest_accuracy": record.variant_accuracy(precision), "arch": manifest.arch, "raw": raw}


def _predict_all(model: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([model.predict(images[i:i + batch]) for i in range(0, len(images), batch)])


def voted_accuracy(member_logits: Sequence[np.ndarray], labels: np.ndarray, voting: str) -> float:
    """Top-1 accuracy of the members' vote, image by image, with the service's voting."""
    from serve.voting import combine, softmax

    probs = np.stack([softmax(logits) for logits in member_logits], axis=1)  # (N, M, C)
    correct = sum(int(combine(probs[i], voting)[1][0] == labels[i]) for i in range(len(labels)))
    return correct / max(len(labels), 1)


def measure(members: Sequence[tuple[Path, int | None]], single: tuple[Path, int | None], *, provider: str = "cpu",
            batch_sizes: Sequence[int] = (1, 64), precision: str = "fp32", max_seconds: float = 8.0) -> dict[str, Any]:
    """The results document (``kind: bench-ensemble``)."""
    from compress.latency import batch_of, validation_arrays
    from compress.runtime.machine import machine_info
    from compress.runtime.sessions import OrtModel, ProviderUnavailable, SessionSettings
    from compress.runtime.timing import interleaved, speedup, summarize

    if len(members) < 2:
        raise UsageError("an ensemble needs at least 2 members")
    if provider == "cuda":
        import torch  # noqa: F401  (the CUDA build of onnxruntime finds its libraries once torch is loaded)
    loaded = [_load(run_dir, step, precision) for run_dir, step in members]
    reference = _load(*single, "fp32")
    for entry in loaded:
        if entry["classes"] != reference["classes"]:
            raise UsageError(f"{entry['name']} has other class names than {reference['name']}: a vote needs the same classes")
    started = time.time()
    images, labels = validation_arrays(reference["raw"])
    settings = SessionSettings(provider, spinning=False)
    try:
        sessions = {e["name"]: OrtModel(e["path"], settings) for e in loaded}
        single_model = OrtModel(reference["path"], settings)
    except ProviderUnavailable as exc:
        raise UsageError(f"--provider {provider}: {exc}") from None
    logits = {name: _predict_all(model, images) for name, model in sessions.items()}
    single_logits = _predict_all(single_model, images)
    accuracy = {
        "members": {name: float((out.argmax(1) == labels).mean()) for name, out in logits.items()},
        "single": float((single_logits.argmax(1) == labels).mean()),
        **{f"ensemble_{voting}": voted_accuracy(list(logits.values()), labels, voting) for voting in VOTINGS},
    }
    throughput = []
    for batch in batch_sizes:
        data = batch_of(images, batch)
        calls = [model.timed_call(data) for model in sessions.values()]

        def ensemble_call(calls: list[Any] = calls) -> None:
            for call in calls:
                call()

        timed = interleaved({"ensemble": ensemble_call, "single": single_model.timed_call(data)},
                            max_seconds=max_seconds)
        stats = {k: summarize(v, batch) for k, v in timed.samples.items()}
        throughput.append({"batch": batch, "ensemble": stats["ensemble"].to_dict(), "single": stats["single"].to_dict(),
                           "ensemble_vs_single": speedup(stats["single"], stats["ensemble"])})
    return {
        "kind": "bench-ensemble",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "settings": {"provider": provider, "providers_in_use": sorted({m.device for m in sessions.values()}),
                     "precision": precision, "batch_sizes": list(batch_sizes), "votings": list(VOTINGS),
                     "validation_images": int(len(labels)), "session": settings.describe(),
                     "ensemble_call": "every member on the same batch, in turn (as the service does)"},
        "members": [{k: v for k, v in e.items() if k not in ("raw", "path", "classes")} | {"onnx": str(e["path"])}
                    for e in loaded],
        "single": {k: v for k, v in reference.items() if k not in ("raw", "path", "classes")} | {"onnx": str(reference["path"])},
        "accuracy": accuracy,
        "throughput": throughput,
        "machine": machine_info(),
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy against images/s at the largest batch: members, the single model, the ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = doc["throughput"][-1]
    members_total_ms = row["ensemble"]["p50_ms"]

    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
        ax.scatter([row["single"]["throughput"]], [doc["accuracy"]["single"]], marker="s", s=60, label="single (unpruned)")
        for voting in VOTINGS:
            ax.scatter([row["ensemble"]["throughput"]], [doc["accuracy"][f"ensemble_{voting}"]], marker="*", s=120,
                       label=f"ensemble, {voting} voting")
        ax.set_xlabel(f"images / s at batch {row['batch']} ({doc['settings']['provider']}; ensemble p50 "
                      f"{members_total_ms:.2f} ms)")
        ax.set_ylabel("top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(path, draw)


def write_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    files = {"results": out_dir / "results.json", "report": out_dir / "report.md", "plot": out_dir / "ensemble.png"}
    atomic_write_json(files["results"], doc)
    plot(doc, files["plot"])
    acc = doc["accuracy"]
    lines = [f"# Voting ensemble of {len(doc['members'])} against one single model", "",
             f"Measured {doc['created']} on ONNX Runtime {doc['settings']['provider']} "
             f"({', '.join(doc['settings']['providers_in_use'])}), {doc['settings']['precision']}, "
             f"{doc['settings']['validation_images']} validation images; voting by the service's code (serve/voting.py).",
             "", "![accuracy vs throughput](ensemble.png)", "",
             "| model | MACs | top-1 |", "|---|---|---|",
             *[f"| member {m['name']} ({m['arch']}) | {m['macs'] / 1e6:.1f} M | {acc['members'][m['name']]:.4f} |"
               for m in doc["members"]],
             f"| ensemble, soft voting | {sum(m['macs'] for m in doc['members']) / 1e6:.1f} M | {acc['ensemble_soft']:.4f} |",
             f"| ensemble, hard voting | {sum(m['macs'] for m in doc['members']) / 1e6:.1f} M | {acc['ensemble_hard']:.4f} |",
             f"| single {doc['single']['name']} ({doc['single']['arch']}) | {doc['single']['macs'] / 1e6:.1f} M | "
             f"{acc['single']:.4f} |", "",
             "| batch | ensemble images/s | single images/s | ensemble / single | ensemble p50 ms | single p50 ms |",
             "|---|---|---|---|---|---|",
             *[f"| {r['batch']} | {r['ensemble']['throughput']:.0f} | {r['single']['throughput']:.0f} | "
               f"{r['ensemble_vs_single']:.2f}x | {r['ensemble']['p50_ms']:.3f} | {r['single']['p50_ms']:.3f} |"
               for r in doc["throughput"]], ""]
    atomic_write_text(files["report"], "\n".join(lines))
    return files

"""The parts of ``bench campaign`` (issue 12's list) and the two profiles they run with.

Each part is a :class:`bench.campaign.Part`; a new part (e.g. the service's GPU options) is one
more entry in :func:`parts` plus a function here, nothing else. Every figure comes from a file
a command wrote (a run's manifest, a ``bench`` results.json); nothing is estimated.

Profiles: ``gpu`` (the real campaign on CIFAR-10, planned for about 25 minutes of an H100) and
``smoke`` (the same sequence on the CPU on a few images per class, tiny epochs and sweeps)."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.rundir import atomic_write_json, atomic_write_text

from .campaign import Context, Part, PartFailed

# --- profiles ----------------------------------------------------------------------------------
# Published references (../shared/datasets/README.md and issue 12): resnet56 on CIFAR-10.
LI_ET_AL = {"name": "Li et al. (L1 filters, ICLR 2017)", "keep_macs": 1 - 0.276, "accuracy_before": 0.9304,
            "accuracy_after": 0.9306, "scope": "block", "steps": 1}
TORCH_PRUNING = {"name": "Torch-Pruning group-L1", "keep_macs": 1 / 2.12, "accuracy_after": 0.9293, "scope": "global",
                 "steps": 2}

GPU = {
    "profile": "gpu",
    "device": "cuda",
    # the models: the primary one (served, swept) and the deep one (compared with the literature)
    "models": {"primary": {"name": "resnet18", "args": ["--arch", "resnet18", "--stem", "cifar"], "epochs": 30,
                           "goal": 0.94},
               "deep": {"name": "resnet56", "args": ["--arch", "resnet56"], "epochs": 30, "goal": 0.93}},
    # from scratch, data held on the GPU, large batch (GPU.md: ~29k images/s for the CIFAR-stem resnet18)
    "train": ["--weights", "none", "--device", "cuda", "--data-on-device", "on", "--batch-size", "512",
              "--optimizer", "sgd", "--sgd-lr", "0.2", "--weight-decay", "5e-4", "--label-smoothing", "0.1",
              "--patience", "0", "--aug-rotation", "0", "--aug-color-jitter", "0", "--aug-scale-min", "0.6",
              "--seed", "0"],
    "inspect_data": True,  # `compress data --json` on the data set
    # step 0: `compress run --prune-steps 0` (export + closing report), then a batch sweep on the latency backend
    "baseline_command": "run",
    "sweep": ["--backends", "ort-cuda", "--batch-sizes", "1,8,64,256,1024,2048,4096,8192", "--no-accuracy",
              "--max-seconds", "2", "--rounds", "5"],
    "sweep_backend": "ort-cuda",
    "fixed_latency_batch": None,
    "saturation": 0.9,  # saturating batch: the smallest reaching 90% of the best throughput
    "prune": ["--target-speedup", "3.0", "--distill-weight", "0.5", "--distill-temperature", "4",
              "--precisions", "fp32,fp16", "--prune-steps", "3", "--target-macs", "0.2", "--retrain-epochs", "5",
              "--retrain-lr", "0.02", "--scope", "global", "--round-to", "8"],
    "latency_backend": "ort-cuda",
    "accuracy_tolerance": 0.005,  # the chosen step: largest measured speed-up within 0.5 point of step 0
    "bench": {"gpu": ["--backends", "ort-cuda,torch-cuda", "--batch-sizes", "1,8,64,256,1024,4096,8192",
                      "--no-accuracy", "--max-seconds", "2", "--rounds", "10"],
              "cpu": ["--backends", "ort-cpu", "--batch-sizes", "1,8,64,256", "--no-accuracy", "--max-seconds", "3",
                      "--rounds", "10"]},
    "published_retrain_epochs": {"li": 8, "tp": 6},
    "published_steps": {"li": LI_ET_AL["steps"], "tp": TORCH_PRUNING["steps"]},
    "ensemble": ["--provider", "cuda", "--max-seconds", "4"],
    "ensemble_batches": [1, 256],
    # the service's runtime options measured on the served model (`bench serve-options`); part 6 uses what they point to
    "serve_options": ["--provider", "cuda", "--max-batch-size", "256", "--batch-sizes", "64,256", "--seconds", "1",
                      "--rounds", "2"],
    "serve": {"provider": "cuda", "workers": [1, 4, 16], "start_timeout": 300, "max_batch_size": 256,
              "classify": ["--concurrency", "1,16,64,256", "--requests", "20000", "--duration", "8"],
              "batch": ["--concurrency", "1,4,16", "--requests", "2000", "--duration", "8"],
              "files_per_request": 32, "baseline_batches": "32,256", "images": 256, "command_timeout": 240},
    "tests": [["-m", "pytest", "-q", "-p", "no:cacheprovider"], ["-m", "pytest", "-q", "-m", "gpu",
                                                                  "-p", "no:cacheprovider"]],
    "tests_timeout": 540,
    "grace_seconds": 30,
    "min_resumable_seconds": 90,
}

SMOKE = {
    **GPU,
    "profile": "smoke",
    "device": "cpu",
    "models": {"primary": {"name": "resnet18", "args": ["--arch", "resnet18", "--stem", "cifar", "--input-size", "16"],
                           "epochs": 1, "goal": 0.94},
               "deep": {"name": "resnet20", "args": ["--arch", "resnet20", "--input-size", "16"], "epochs": 1,
                        "goal": 0.93, "stands_for": "resnet56"}},
    "train": ["--weights", "none", "--device", "cpu", "--data-on-device", "on", "--batch-size", "32",
              "--optimizer", "sgd", "--patience", "0", "--workers", "0", "--seed", "0", "--timing-seconds", "0.2"],
    "subset": {"train": 6, "test": 3},  # images per class taken from --data
    "inspect_data": False,
    # fewer processes (each one imports torch: ~5 s here): step 0 alone, pruning steered at a fixed batch
    "baseline_command": "finetune",
    "sweep": None,
    "sweep_backend": "ort-cpu",
    "fixed_latency_batch": 8,
    "prune": ["--target-speedup", "3.0", "--distill-weight", "0.5", "--precisions", "fp32,fp16", "--prune-steps", "1",
              "--target-macs", "0.5", "--retrain-epochs", "1", "--scope", "global", "--round-to", "8"],
    "latency_backend": "ort-cpu",
    "bench": {"all": ["--backends", "ort-cpu,torch-cpu", "--batch-sizes", "1,4", "--no-accuracy", "--max-seconds",
                      "0.3", "--rounds", "2", "--warmup", "1", "--min-seconds", "0"]},
    "published_retrain_epochs": {"li": 1, "tp": 1},
    "published_steps": {"li": 1, "tp": 1},
    "ensemble": ["--provider", "cpu", "--max-seconds", "0.3"],
    "ensemble_batches": [1, 4],
    "serve_options": ["--provider", "cpu", "--max-batch-size", "4", "--batch-sizes", "1,4", "--seconds", "0.05",
                      "--rounds", "1"],
    "serve": {"provider": "cpu", "workers": [1], "start_timeout": 120, "max_batch_size": 64,
              "classify": ["--concurrency", "1,4", "--requests", "20", "--duration", "3"],
              "batch": ["--concurrency", "2", "--requests", "4", "--duration", "3"],
              "files_per_request": 4, "baseline_batches": "4", "images": 12, "command_timeout": 120},
    # not the whole suite (the smoke runs inside it): the GPU tests (skipped without CUDA) and two fast ones
    "tests": [["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_bench.py", "-k",
               "gpu or cuda or summarize_percentiles or check_target"]],
    "tests_timeout": 120,
    "grace_seconds": 10,
    "min_resumable_seconds": 5,
}


def profile(smoke: bool) -> dict[str, Any]:
    return SMOKE if smoke else GPU


# --- helpers -----------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PartFailed(f"cannot read {path}: {exc}") from None


def run_dir(ctx: Context, name: str) -> Path:
    return ctx.work / "runs" / name


def step_entry(manifest: dict[str, Any], step: int) -> dict[str, Any]:
    return next(s for s in manifest["steps"] if s["step"] == step)


def write_part_files(ctx: Context, summary: dict[str, Any], markdown: list[str]) -> None:
    """The part's own ``summary.json`` and ``README.md`` (with its exact commands)."""
    folder = ctx.part_out
    commands = ctx.part_state.get("commands", [])
    atomic_write_json(folder / "summary.json", {"part": ctx.part.name, "title": ctx.part.title,
                                                "profile": ctx.settings["profile"], "commands": commands,
                                                "summary": summary})
    text = [f"# {ctx.part.name}: {ctx.part.title}", "", *markdown, "", "## Commands", "",
            "Run from the repository root (`python` is the interpreter the campaign ran with).", "", "```",
            *commands, "```", ""]
    atomic_write_text(folder / "README.md", "\n".join(text))


def saturation(results: dict[str, Any], backend: str, step: int = 0, precision: str = "fp32",
               fraction: float = 0.9) -> dict[str, Any] | None:
    """Where throughput saturates for one model on one backend: the best images/s, and the
    smallest batch size reaching ``fraction`` of it."""
    rows = sorted((r for r in results["results"] if r["backend"] == backend and r["step"] == step
                   and r["precision"] == precision), key=lambda r: r["batch"])
    if not rows:
        return None
    best = max(rows, key=lambda r: r["latency"]["throughput"])
    peak = best["latency"]["throughput"]
    first = next(r for r in rows if r["latency"]["throughput"] >= fraction * peak)
    return {"backend": backend, "step": step, "precision": precision, "peak_images_per_s": peak,
            "peak_batch": best["batch"], "saturating_batch": first["batch"], "fraction": fraction,
            "images_per_s_by_batch": {str(r["batch"]): r["latency"]["throughput"] for r in rows},
            "largest_batch_measured": rows[-1]["batch"]}


def choose_pruned_step(manifest: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The step with the largest measured speed-up within ``tolerance`` of step 0's accuracy;
    when none is, the most accurate pruned step, marked as outside the tolerance."""
    base = step_entry(manifest, 0)["accuracy"]
    pruned = [s for s in manifest["steps"] if s["step"] > 0 and s.get("speedup_measured")]
    if not pruned:
        raise PartFailed("no pruned step with a measured speed-up in the run")
    within = [s for s in pruned if s["accuracy"] >= base - tolerance - 1e-12]
    chosen = max(within, key=lambda s: s["speedup_measured"]["speedup"]) if within else max(pruned, key=lambda s: s["accuracy"])
    return {"step": chosen["step"], "within_tolerance": bool(within), "accuracy": chosen["accuracy"],
            "step0_accuracy": base, "accuracy_delta": chosen["accuracy"] - base,
            "macs_ratio": chosen["macs"] / step_entry(manifest, 0)["macs"],
            "measured": chosen["speedup_measured"],
            "fp16_accuracy": ((chosen.get("variants") or {}).get("fp16") or {}).get("accuracy"),
            "all_steps": [{"step": s["step"], "accuracy": s["accuracy"], "macs_ratio": s["macs"] / step_entry(manifest, 0)["macs"],
                           "speedup": (s.get("speedup_measured") or {}).get("speedup")} for s in manifest["steps"]]}


def model_specs(ctx: Context) -> dict[str, dict[str, Any]]:
    return ctx.settings["models"]


# --- part 0: data ------------------------------------------------------------------------------
def resolve_data(ctx: Context) -> Path:
    """The image folder to use: --data itself (a folder), or the archive unpacked once into
    the work folder (resumably: unpacked beside, then renamed), or, in the smoke, a subset of a
    few images per class (or generated images when no --data was given)."""
    source = ctx.state["data"]
    target = ctx.work / "data"
    if ctx.smoke:
        subset = target / "smoke-subset"
        if not subset.is_dir():
            partial = target / "smoke-subset.partial"
            shutil.rmtree(partial, ignore_errors=True)
            if source == "generated":
                generate_images(partial, ctx.settings["subset"])
            else:
                copy_subset(Path(source), partial, ctx.settings["subset"])
            partial.rename(subset)
        return subset
    path = Path(source)
    if path.is_dir():
        return path
    unpacked = target / "cifar10"
    if not unpacked.is_dir():
        partial = target / "cifar10.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        ctx.echo(f"  unpacking {path} into {unpacked}")
        with tarfile.open(path) as archive:
            archive.extractall(partial, filter="data")
        inner = archive_root(partial)
        inner.rename(unpacked) if inner != partial else partial.rename(unpacked)
        shutil.rmtree(partial, ignore_errors=True)
    return unpacked


def archive_root(folder: Path) -> Path:
    """The folder holding train/ (the archive may wrap it in one top folder)."""
    if (folder / "train").is_dir():
        return folder
    children = [p for p in folder.iterdir() if p.is_dir()]
    if len(children) == 1 and (children[0] / "train").is_dir():
        return children[0]
    raise UsageError(f"--data: the archive holds no train/ folder (ImageFolder layout: train/<class>/*, test/<class>/*)")


def copy_subset(source: Path, target: Path, per_class: dict[str, int]) -> None:
    """The first few images per class of each split, from a folder or a .tar.xz archive."""
    wanted = {"train": per_class["train"], "test": per_class["test"]}
    if source.is_dir():
        for split, count in wanted.items():
            folder = source / split if (source / split).is_dir() else source / "val"
            for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                files = sorted(p for p in class_dir.iterdir() if p.is_file())[:count]
                (target / split / class_dir.name).mkdir(parents=True, exist_ok=True)
                for file in files:
                    shutil.copyfile(file, target / split / class_dir.name / file.name)
        return
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(source) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            split, label = parts[-3], parts[-2]
            split = "test" if split == "val" else split
            if split not in wanted or taken.get((split, label), 0) >= wanted[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            folder = target / split / label
            folder.mkdir(parents=True, exist_ok=True)
            handle = archive.extractfile(member)
            (folder / Path(member.name).name).write_bytes(handle.read() if handle else b"")


def generate_images(target: Path, per_class: dict[str, int]) -> None:
    """Three learnable classes of 24 px JPEGs (a colour, noise and a darker square), for a
    smoke without --data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
    for split, count in (("train", per_class["train"] * 2), ("test", per_class["test"] * 2)):
        for name, colour in colours.items():
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.array(colour, float)[None, None, :] * rng.uniform(0.7, 1.0) + rng.normal(0, 25, (24, 24, 3))
                x, y = rng.integers(0, 12, 2)
                pixels[y:y + 8, x:x + 8] *= 0.5
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{index:04d}.jpg", quality=90)


def part_data(ctx: Context) -> dict[str, Any]:
    folder = resolve_data(ctx)
    inside = ctx.work.resolve() in folder.resolve().parents
    ctx.state["data_dir"] = str(folder.resolve().relative_to(ctx.work.resolve()) if inside else folder.resolve())
    if ctx.settings["inspect_data"]:
        ctx.run("inspect", ctx.python("-m", "compress", "data", str(folder), "--json"))
    counts = {split: sum(1 for p in (folder / split).rglob("*") if p.is_file()) for split in ("train", "test")
              if (folder / split).is_dir()}
    summary = {"data_dir": str(folder), "images": counts,
               "line": f"{counts.get('train', 0)} train / {counts.get('test', 0)} test images in {folder}"}
    source = ctx.state["data"]
    write_part_files(ctx, summary, [f"Source: `{source}`; used: `{folder}` ({summary['line']})."
                                    + (" Smoke: a few images per class." if ctx.smoke else "")])
    return summary


def data_outputs(ctx: Context) -> list[Path]:
    return [ctx.data_dir] if ctx.state.get("data_dir") else [ctx.work / "data"]


# --- part 1: baselines -------------------------------------------------------------------------
def part_baselines(ctx: Context) -> dict[str, Any]:
    """Fine-tune both models from scratch with the data on the device (``compress run
    --prune-steps 0``: step 0, its ONNX export and the report), then sweep step 0's batch size on
    the latency backend to find where its throughput saturates (the batch pruning steers at)."""
    out: dict[str, Any] = {"models": {}}
    for role, spec in model_specs(ctx).items():
        folder = run_dir(ctx, f"{spec['name']}-base")
        command = ctx.settings["baseline_command"]
        ctx.run(f"{role}-train", ctx.python("-m", "compress", command, "--data", str(ctx.data_dir), "--out", str(folder),
                                            *spec["args"], *ctx.settings["train"], "--epochs", str(spec["epochs"]),
                                            *(["--prune-steps", "0"] if command == "run" else [])))
        sat = None
        if ctx.settings["sweep"]:
            sweep_dir = ctx.part_out / f"{spec['name']}-sweep"
            ctx.run(f"{role}-sweep", ctx.python("-m", "bench", "models", str(folder), *ctx.settings["sweep"],
                                                "--out", str(sweep_dir)))
            sat = saturation(read_json(sweep_dir / "results.json"), ctx.settings["sweep_backend"],
                             fraction=ctx.settings["saturation"])
        manifest = read_json(folder / "manifest.json")
        stage = manifest["stages"].get("finetune", {})
        history = stage.get("history") or []
        out["models"][role] = {
            "name": spec["name"], "stands_for": spec.get("stands_for"), "run_dir": str(folder),
            "accuracy": step_entry(manifest, 0)["accuracy"], "goal": spec["goal"],
            "goal_reached": step_entry(manifest, 0)["accuracy"] >= spec["goal"], "epochs": spec["epochs"],
            "train_seconds": stage.get("seconds"), "device": stage.get("device"),
            "data_on_device": stage.get("data_on_device"),
            "images_per_s": [h.get("images_per_s") for h in history if isinstance(h, dict)],
            "macs": step_entry(manifest, 0)["macs"], "params": step_entry(manifest, 0)["params"],
            "saturation": sat}
    models = out["models"]
    out["line"] = "; ".join(f"{m['name']} top-1 {m['accuracy']:.4f} ({m['epochs']} epochs), saturating batch "
                            f"{m['saturation']['saturating_batch'] if m['saturation'] else 'not swept'}"
                            for m in models.values())
    rows = ["| model | epochs | top-1 | goal | train s | images/s (last epoch) | MACs | saturating batch on "
            f"{ctx.settings['sweep_backend']} (90% of best) | best images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for m in models.values():
        sat = m["saturation"] or {}
        ips = [x for x in m["images_per_s"] if x]
        rows.append(f"| {m['name']} | {m['epochs']} | {m['accuracy']:.4f} | {m['goal']:.2f} "
                    f"({'reached' if m['goal_reached'] else 'not reached'}) | {m['train_seconds']} | "
                    f"{f'{ips[-1]:.0f}' if ips else '-'} | {m['macs'] / 1e6:.1f} M | {sat.get('saturating_batch', '-')} | "
                    f"{sat.get('peak_images_per_s', 0):.0f} |")
    swept = ("then step 0 swept over batch sizes (`*-sweep/`: report.md, throughput.png)." if ctx.settings["sweep"]
             else f"not swept (smoke): pruning steers at batch {ctx.settings['fixed_latency_batch']}.")
    write_part_files(ctx, out, ["Fine-tuned from scratch with the images held on the training device; " + swept, "", *rows])
    return out


def baseline_outputs(ctx: Context) -> list[Path]:
    return [run_dir(ctx, f"{spec['name']}-base") / "steps" / "step_00" / "model.pt" for spec in model_specs(ctx).values()]


# --- part 2: pruning with --target-speedup on the latency backend -------------------------------------
def part_prune(ctx: Context) -> dict[str, Any]:
    base = ctx.summary_of("1-baselines")["models"]
    out: dict[str, Any] = {"models": {}}
    for role, spec in model_specs(ctx).items():
        sat = base[role]["saturation"]
        batch = sat["saturating_batch"] if sat else ctx.settings["fixed_latency_batch"] or 256
        source = run_dir(ctx, f"{spec['name']}-base") / "steps" / "step_00" / "model.pt"
        folder = run_dir(ctx, f"{spec['name']}-pruned")
        ctx.run(f"{role}-open", ctx.python("-m", "compress", "finetune", "--data", str(ctx.data_dir), "--out", str(folder),
                                           *spec["args"], *ctx.settings["train"], "--model", str(source),
                                           "--latency-backend", ctx.settings["latency_backend"], "--latency-batch",
                                           str(batch), *ctx.settings["prune"]))
        ctx.run(f"{role}-prune", ctx.python("-m", "compress", "prune", str(folder)))
        manifest = read_json(folder / "manifest.json")
        chosen = choose_pruned_step(manifest, ctx.settings["accuracy_tolerance"])
        out["models"][role] = {"name": spec["name"], "run_dir": str(folder), "latency_batch": batch,
                               "target_speedup": manifest["stages"].get("target_speedup"), "chosen": chosen}
    out["line"] = "; ".join(f"{m['name']} step {m['chosen']['step']}: {m['chosen']['measured']['speedup']:.2f}x on "
                            f"{m['chosen']['measured']['backend']} batch {m['latency_batch']}, top-1 "
                            f"{m['chosen']['accuracy']:.4f} ({m['chosen']['accuracy_delta'] * 100:+.2f} pt)"
                            for m in out["models"].values())
    rows = ["| model | step | MACs kept | top-1 | vs step 0 | measured speed-up (backend, batch) | within "
            f"{ctx.settings['accuracy_tolerance'] * 100:.1f} pt | fp16 top-1 |", "|---|---|---|---|---|---|---|---|"]
    tolerance = ctx.settings["accuracy_tolerance"]
    for m in out["models"].values():
        chosen = m["chosen"]
        for s in chosen["all_steps"]:
            mark = " **chosen**" if s["step"] == chosen["step"] else ""
            within = "yes" if s["accuracy"] >= chosen["step0_accuracy"] - tolerance - 1e-12 else "no"
            fp16 = chosen["fp16_accuracy"] if s["step"] == chosen["step"] and chosen["fp16_accuracy"] is not None else None
            rows.append(f"| {m['name']} | {s['step']}{mark} | {s['macs_ratio']:.1%} | {s['accuracy']:.4f} | "
                        f"{(s['accuracy'] - chosen['step0_accuracy']) * 100:+.2f} pt | {fmt_x(s['speedup'])} "
                        f"({ctx.settings['latency_backend']}, {m['latency_batch']}) | {within} | "
                        f"{'-' if fp16 is None else f'{fp16:.4f}'} |")
    write_part_files(ctx, out, ["Pruned from step 0 with `--target-speedup` measured on "
                                f"{ctx.settings['latency_backend']} at the saturating batch of part 1, retrained with "
                                "distillation from step 0, fp32 and fp16 variants of every step. The chosen step has "
                                "the largest measured speed-up within the tolerance.", "", *rows])
    return out


def prune_outputs(ctx: Context) -> list[Path]:
    return [run_dir(ctx, f"{spec['name']}-pruned") / "manifest.json" for spec in model_specs(ctx).values()]


# --- part 3: bench models batch sweeps ------------------------------------------------------------
def part_bench_models(ctx: Context) -> dict[str, Any]:
    pruned = ctx.summary_of("2-prune")["models"]
    out: dict[str, Any] = {"models": {}}
    for role, spec in model_specs(ctx).items():
        folder = run_dir(ctx, f"{spec['name']}-pruned")
        chosen = pruned[role]["chosen"]["step"]
        results = {}
        for kind, args in ctx.settings["bench"].items():
            target = ctx.part_out / f"{spec['name']}-{kind}"
            ctx.run(f"{role}-{kind}", ctx.python("-m", "bench", "models", str(folder), *args, "--out", str(target)))
            results[kind] = read_json(target / "results.json")
        rows = [r for doc in results.values() for r in doc["results"]]
        sats = {}
        for doc in results.values():
            for backend in sorted({r["backend"] for r in doc["results"]}):
                for step, precision in ((0, "fp32"), (chosen, "fp32"), (chosen, "fp16")):
                    found = saturation(doc, backend, step, precision, ctx.settings["saturation"])
                    if found:
                        sats[f"{backend} step {step} {precision}"] = found

        def speedup_at(backend: str, batch: int, precision: str) -> float | None:
            row = next((r for r in rows if r["backend"] == backend and r["step"] == chosen and r["precision"] == precision
                        and r["batch"] == batch), None)
            return row["speedup"] if row else None

        gpu_backend = ctx.settings["latency_backend"]
        sat_batch = (sats.get(f"{gpu_backend} step 0 fp32") or {}).get("saturating_batch")
        out["models"][role] = {
            "name": spec["name"], "chosen_step": chosen, "saturation": sats,
            "skipped": [s for doc in results.values() for s in doc.get("skipped", [])],
            "headline": {"backend": gpu_backend, "saturating_batch": sat_batch,
                         "speedup_at_saturating": speedup_at(gpu_backend, sat_batch, "fp32") if sat_batch else None,
                         "speedup_at_256": speedup_at(gpu_backend, 256, "fp32"),
                         "fp16_speedup_at_saturating": speedup_at(gpu_backend, sat_batch, "fp16") if sat_batch else None,
                         "fp16_speedup_at_256": speedup_at(gpu_backend, 256, "fp16")}}
    out["line"] = "; ".join(f"{m['name']} step {m['chosen_step']}: {fmt_x(m['headline']['speedup_at_saturating'])} at the "
                            f"saturating batch {m['headline']['saturating_batch']}, {fmt_x(m['headline']['speedup_at_256'])} "
                            f"at 256 ({m['headline']['backend']})" for m in out["models"].values())
    rows = ["| model | backend, step, precision | saturating batch (90% of best) | best images/s | at batch |",
            "|---|---|---|---|---|"]
    for m in out["models"].values():
        for key, sat in m["saturation"].items():
            rows.append(f"| {m['name']} | {key} | {sat['saturating_batch']} | {sat['peak_images_per_s']:.0f} | "
                        f"{sat['peak_batch']} |")
    write_part_files(ctx, out, ["`bench models` on every step and precision of the pruned runs; each folder has its "
                                "report.md, results.json, throughput.png, speedup_vs_macs.png and Pareto plots. "
                                "Where throughput saturates:", "", *rows,
                                "", "Skipped backends/precisions (with reasons) are listed in each results.json."])
    return out


def fmt_x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "missing"


# --- part 4: resnet56 at the published MAC reductions -------------------------------------------------
def part_published(ctx: Context) -> dict[str, Any]:
    spec = model_specs(ctx)["deep"]
    source = run_dir(ctx, f"{spec['name']}-base") / "steps" / "step_00" / "model.pt"
    out: dict[str, Any] = {"model": spec["name"], "stands_for": spec.get("stands_for"), "runs": {}}
    for key, ref in (("li", LI_ET_AL), ("tp", TORCH_PRUNING)):
        folder = run_dir(ctx, f"{spec['name']}-{key}")
        ctx.run(key, ctx.python("-m", "compress", "run", "--data", str(ctx.data_dir), "--out", str(folder), *spec["args"],
                                *ctx.settings["train"], "--model", str(source), "--prune-steps", str(ctx.settings["published_steps"][key]),
                                "--target-macs", f"{ref['keep_macs']:.4f}", "--scope", ref["scope"],
                                "--retrain-epochs", str(ctx.settings["published_retrain_epochs"][key]),
                                "--distill-weight", "0.5", "--round-to", "8"))
        manifest = read_json(folder / "manifest.json")
        last = max(manifest["steps"], key=lambda s: s["step"])
        base = step_entry(manifest, 0)
        out["runs"][key] = {"reference": ref, "run_dir": str(folder), "step0_accuracy": base["accuracy"],
                            "accuracy": last["accuracy"], "macs_ratio": last["macs"] / base["macs"],
                            "macs_reduction": base["macs"] / last["macs"], "step": last["step"]}
        atomic_write_text(ctx.part_out / f"{key}-report.md", (folder / "report.md").read_text())
    out["line"] = "; ".join(f"{r['reference']['name']}: ours {r['accuracy']:.4f} at {r['macs_reduction']:.2f}x fewer MACs "
                            f"(published {r['reference']['accuracy_after']:.4f})" for r in out["runs"].values())
    rows = ["| reference | MACs kept (published) | MACs kept (ours) | published top-1 | our step 0 | ours pruned |",
            "|---|---|---|---|---|---|"]
    for r in out["runs"].values():
        ref = r["reference"]
        rows.append(f"| {ref['name']} | {ref['keep_macs']:.1%} | {r['macs_ratio']:.1%} | "
                    f"{ref.get('accuracy_before', float('nan')):.4f} -> {ref['accuracy_after']:.4f} | "
                    f"{r['step0_accuracy']:.4f} | {r['accuracy']:.4f} |")
    write_part_files(ctx, out, [f"{spec['name']} step 0 of part 1, pruned to the published MAC reductions (scope "
                                "block for Li et al., global for Torch-Pruning), retrained with distillation. Published "
                                "numbers are on the original CIFAR-10 with long retraining; this JPEG copy costs "
                                "about 0.5-1 point.", "", *rows, "", "Each run's closing report: `li-report.md`, "
                                "`tp-report.md`."])
    return out


def published_outputs(ctx: Context) -> list[Path]:
    spec = model_specs(ctx)["deep"]
    return [run_dir(ctx, f"{spec['name']}-{key}") / "manifest.json" for key in ("li", "tp")]


# --- part 5: ensemble ---------------------------------------------------------------------------
def part_ensemble(ctx: Context) -> dict[str, Any]:
    pruned = ctx.summary_of("2-prune")["models"]
    specs = model_specs(ctx)
    members = [f"{run_dir(ctx, specs[role]['name'] + '-pruned')}:{pruned[role]['chosen']['step']}"
               for role in ("primary", "deep")]
    tp = run_dir(ctx, f"{specs['deep']['name']}-tp")
    tp_last = max(s["step"] for s in read_json(tp / "manifest.json")["steps"])
    members.append(f"{tp}:{tp_last}")
    single = f"{run_dir(ctx, specs['primary']['name'] + '-pruned')}:0"  # step 0 there: the unpruned model, exported
    sat = (ctx.summary_of("1-baselines")["models"]["primary"].get("saturation") or {}).get("saturating_batch")
    batches = sorted({*ctx.settings["ensemble_batches"], *([sat] if sat else [])})
    ctx.run("ensemble", ctx.python("-m", "bench", "ensemble", *members, "--single", single, *ctx.settings["ensemble"],
                                   "--batch-sizes", ",".join(map(str, batches)), "--out", str(ctx.part_out)))
    doc = read_json(ctx.part_out / "results.json")
    out = {"members": members, "single": single, "accuracy": doc["accuracy"], "throughput": doc["throughput"],
           "providers": doc["settings"]["providers_in_use"]}
    last = doc["throughput"][-1]
    out["line"] = (f"ensemble top-1 {doc['accuracy']['ensemble_soft']:.4f} soft / {doc['accuracy']['ensemble_hard']:.4f} "
                   f"hard vs single {doc['accuracy']['single']:.4f}; batch {last['batch']}: "
                   f"{last['ensemble']['throughput']:.0f} vs {last['single']['throughput']:.0f} images/s")
    write_part_files(ctx, out, ["Three pruned models voting (the service's soft and hard voting) against the unpruned "
                                "primary model: `report.md`, `results.json`, `ensemble.png`.", "", out["line"]])
    return out


# --- part 6a: the service's runtime options ------------------------------------------------------
def part_serve_options(ctx: Context) -> dict[str, Any]:
    """cuDNN search and workspace, padded or exact batch shapes, model threads and sessions,
    measured on the model the service will serve (`bench serve-options`)."""
    pruned = ctx.summary_of("2-prune")["models"]["primary"]
    source = run_dir(ctx, f"{model_specs(ctx)['primary']['name']}-pruned")
    step = pruned["chosen"]["step"]
    ctx.run("serve-options", ctx.python("-m", "bench", "serve-options", f"{source}:{step}",
                                        *ctx.settings["serve_options"], "--out", str(ctx.part_out)))
    doc = read_json(ctx.part_out / "results.json")
    env = doc["recommended_env"]
    out = {"model": f"{source.name}:{step}", "provider": doc["provider"], "recommended_env": env,
           "cudnn": doc.get("cudnn"), "batch_shapes": doc["batch_shapes"], "model_threads": doc["model_threads"],
           "line": "settings measured best: " + " ".join(f"{k}={v}" for k, v in env.items())}
    write_part_files(ctx, out, ["`bench serve-options` on the model part 6 serves (`report.md`, `results.json`); "
                                "part 6 runs the service with the settings it points to.", "", out["line"]])
    return out


# --- part 6: the service ---------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_images(ctx: Context, count: int) -> Path:
    """A folder of ``count`` validation images (the service is sent real files)."""
    folder = ctx.work / "serve-images"
    if not folder.is_dir() or sum(1 for _ in folder.iterdir()) < count:
        split = ctx.data_dir / "test" if (ctx.data_dir / "test").is_dir() else ctx.data_dir / "val"
        files = sorted(p for p in split.rglob("*") if p.is_file())
        step = max(1, len(files) // count)
        folder.mkdir(parents=True, exist_ok=True)
        for index, file in enumerate(files[::step][:count]):
            shutil.copyfile(file, folder / f"{index:04d}{file.suffix}")
    return folder


class Service:
    """``python -m bentoml serve`` on 127.0.0.1 for one configuration, always stopped (its whole
    process group, then any worker left), bounded in time to start."""

    def __init__(self, ctx: Context, env: dict[str, str], log: Path) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.argv = ctx.python("-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(self.port))
        self.command = ctx.shown(self.argv, env)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._handle = open(log, "ab")
        import os

        from .campaign import REPO

        self.process = subprocess.Popen(self.argv, cwd=REPO, env={**os.environ, **ctx.extra_env, **env},
                                        stdout=self._handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        self.children: set[int] = set()

    def wait_ready(self, timeout: float, deadline_left: float) -> float:
        import time

        import httpx

        from .campaign import DeadlineReached, last_line

        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise PartFailed(f"bentoml serve exited with {self.process.returncode}: {last_line(self.log)} "
                                 f"(log: {self.log})")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self._remember_children()
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            spent = time.monotonic() - started
            if spent > deadline_left:
                raise DeadlineReached(self.command)
            if spent > timeout:
                raise PartFailed(f"bentoml serve not ready after {timeout:.0f} s (log: {self.log})")
            time.sleep(0.5)

    def _remember_children(self) -> None:
        import psutil

        try:
            self.children |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        import os
        import signal

        from .campaign import stop_process_group

        self._remember_children()
        stop_process_group(self.process, 20)
        for pid in self.children:  # BentoML's workers may run in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._handle.close()


def part_service(ctx: Context) -> dict[str, Any]:
    import time

    pruned = ctx.summary_of("2-prune")["models"]["primary"]
    settings = ctx.settings["serve"]
    home = ctx.work / "bentoml"
    step = pruned["chosen"]["step"]
    name = f"campaign-{model_specs(ctx)['primary']['name']}"
    source = run_dir(ctx, f"{name.removeprefix('campaign-')}-pruned")
    tag_file = ctx.work / "serve-tag.txt"
    register = ctx.python("-m", "compress", "register", str(source), "--step", str(step), "--name", name)
    if not tag_file.is_file():  # the store lives in the work folder: registered again on a fresh machine
        finished = ctx.part_state.setdefault("finished", [])
        if "register" in finished:
            finished.remove("register")
        ctx.run("register", register, env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"})
        atomic_write_text(tag_file, last_tag(ctx.out / "logs" / ctx.part.name / "register.log") + "\n")
    tag = tag_file.read_text().strip()
    images = serve_images(ctx, settings["images"])
    levels: dict[str, Any] = {}
    for workers in settings["workers"]:
        keys = [f"w{workers}-classify", f"w{workers}-batch"]
        if all(ctx.done(k) for k in keys):
            ctx.echo(f"  = the service with {workers} worker(s): measured in an earlier call")
            continue
        env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SERVE_MODELS": tag,
               "SERVE_WORKERS": str(workers), "SERVE_PROVIDER": settings["provider"],
               "SERVE_MAX_BATCH_SIZE": str(settings["max_batch_size"]), "SERVE_MAX_FILES": "64",
               **ctx.summary_of("6a-serve-options").get("recommended_env", {})}
        service = Service(ctx, env, ctx.out / "logs" / ctx.part.name / f"serve-w{workers}.log")
        ctx.record(service.command)
        try:
            ctx.echo(f"  $ {service.command}")
            seconds = service.wait_ready(settings["start_timeout"], ctx.remaining())
            ctx.echo(f"    ready in {seconds:.1f} s at {service.url}")
            ctx.part_state.setdefault("startup_seconds", {})[str(workers)] = round(seconds, 1)
            common = ["--images", str(images), "--baseline", f"{source}:{step}",
                      "--baseline-provider", settings["provider"], "--baseline-batches", settings["baseline_batches"],
                      "--timeout", "30"]
            ctx.run(keys[0], ctx.python("-m", "bench", "serve", service.url, *common, *settings["classify"],
                                        "--out", str(ctx.part_out / keys[0])), timeout=settings["command_timeout"])
            ctx.run(keys[1], ctx.python("-m", "bench", "serve", service.url, *common, *settings["batch"],
                                        "--endpoint", "/classify_batch", "--field", "images", "--files-per-request",
                                        str(settings["files_per_request"]), "--out", str(ctx.part_out / keys[1])),
                    timeout=settings["command_timeout"])
        finally:
            service.stop()
            time.sleep(0.5)
    best: dict[str, Any] | None = None
    rows = ["| workers | endpoint | concurrency | requests/s | images/s | p50 ms | p99 ms | errors | raw ORT "
            f"{settings['provider']} best images/s (batch) | fraction of raw best |", "|---|---|---|---|---|---|---|---|---|---|"]
    for workers in settings["workers"]:
        for kind in ("classify", "batch"):
            doc = read_json(ctx.part_out / f"w{workers}-{kind}" / "results.json")
            raw = doc.get("baseline") or {}
            raw_best = max(raw.get("batches", {}).items(), key=lambda kv: kv[1]["images_per_s"], default=(None, None))
            for level in doc["levels"]:
                entry = {"workers": workers, "endpoint": doc["url"].rsplit("/", 1)[-1], "concurrency": level["concurrency"],
                         "images_per_s": level.get("images_per_s", level["ok_per_s"]),
                         "requests_per_s": level["requests_per_s"], "errors": level["errors"],
                         "fraction_of_raw_best": level.get("fraction_of_in_process_best"),
                         "raw_best_images_per_s": raw_best[1]["images_per_s"] if raw_best[1] else None,
                         "raw_best_batch": raw_best[0]}
                levels.setdefault(f"w{workers}-{kind}", []).append(entry)
                if best is None or entry["images_per_s"] > best["images_per_s"]:
                    best = entry
                lat = level.get("latency") or {}
                raw_text = f"{entry['raw_best_images_per_s']:.0f} ({raw_best[0]})" if raw_best[1] else "-"
                fraction = entry["fraction_of_raw_best"]
                rows.append(f"| {workers} | /{entry['endpoint']} | {level['concurrency']} | {level['requests_per_s']:.1f} | "
                            f"{entry['images_per_s']:.1f} | {lat.get('p50_ms', float('nan')):.1f} | "
                            f"{lat.get('p99_ms', float('nan')):.1f} | {level['errors']} | {raw_text} | "
                            f"{'-' if fraction is None else f'{fraction:.0%}'} |")
    out = {"tag": tag, "step": step, "provider": settings["provider"], "levels": levels, "best": best,
           "startup_seconds": ctx.part_state.get("startup_seconds")}
    if best:
        out["line"] = (f"best {best['images_per_s']:.0f} images/s with {best['workers']} worker(s) on /{best['endpoint']} at "
                       f"concurrency {best['concurrency']}"
                       + (f", {best['fraction_of_raw_best']:.0%} of raw ORT {settings['provider']}"
                          if best["fraction_of_raw_best"] is not None else ""))
    write_part_files(ctx, out, [f"`bentoml serve` with `SERVE_PROVIDER={settings['provider']}`, "
                                f"`SERVE_MAX_BATCH_SIZE={settings['max_batch_size']}`, workers {settings['workers']}, "
                                f"model `{tag}` (step {step} of the pruned {model_specs(ctx)['primary']['name']}); "
                                "`bench serve` on `/classify` and on `/classify_batch` "
                                f"({settings['files_per_request']} images per request), with the same model timed "
                                "in-process on raw ONNX Runtime in the same run (`--baseline`). Each folder has "
                                "report.md, results.json and load.png.", "", *rows])
    return out


def last_tag(log: Path) -> str:
    """The tag ``compress register`` printed (its last output line)."""
    from .campaign import last_line

    tag = last_line(log)
    if ":" not in tag or " " in tag:
        raise PartFailed(f"compress register printed no model tag (log: {log})")
    return tag


# --- part 7: the test suite --------------------------------------------------------------------
def part_tests(ctx: Context) -> dict[str, Any]:
    results = []
    for index, args in enumerate(ctx.settings["tests"]):
        key = f"pytest-{index}"
        code = ctx.run(key, ctx.python(*args), timeout=ctx.settings["tests_timeout"], check=False)
        log = ctx.out / "logs" / ctx.part.name / f"{key}.log"
        results.append({"command": ctx.shown(ctx.python(*args)), "exit_code": code, "result": pytest_result(log)})
    out = {"runs": results, "line": "; ".join(f"{r['command'].split('pytest', 1)[1].strip() or 'whole suite'}: "
                                              f"{r['result']}" for r in results)}
    if ctx.smoke:
        out["note"] = "smoke: two fast tests and the GPU tests only (the whole suite runs this smoke itself)"
    write_part_files(ctx, out, ["| command | exit code | result |", "|---|---|---|",
                                *[f"| `{r['command']}` | {r['exit_code']} | {r['result']} |" for r in results],
                                *([f"", out["note"]] if ctx.smoke else [])])
    return out


def pytest_result(log: Path) -> str:
    """pytest's closing line (``== 5 passed, 2 skipped in 3.2s ==``) from a log."""
    import re

    text = log.read_text(errors="replace") if log.is_file() else ""
    found = re.findall(r"^=*\s*((?:\d+ \w+,? ?)+in [\d.]+s(?: \([^)]*\))?)\s*=*$", text, flags=re.MULTILINE)
    return found[-1].strip() if found else "no pytest result line (see the log)"


# --- the list ---------------------------------------------------------------------------------
def parts() -> list[Part]:
    """The campaign, in order. GPU minutes are planned for an H100 (about 25 in all); a part
    that needs another's work files names it in ``needs``."""
    return [
        Part("0-data", "the data set (unpacked once into the work folder; the smoke takes a few images per class)",
             gpu_minutes=0.5, smoke_minutes=0.1, run=part_data, resumable=True, outputs=data_outputs),
        Part("1-baselines", "resnet18 (CIFAR stem) and resnet56 from scratch, data on the GPU; batch sweep of step 0",
             gpu_minutes=5.0, smoke_minutes=0.4, run=part_baselines, resumable=True, needs=("0-data",),
             outputs=baseline_outputs),
        Part("2-prune", "--target-speedup on ort-cuda at the saturating batch, distillation, fp32 + fp16",
             gpu_minutes=6.0, smoke_minutes=0.4, run=part_prune, resumable=True, needs=("0-data", "1-baselines"),
             outputs=prune_outputs),
        Part("3-bench-models", "bench models on ort-cuda, torch-cuda and ort-cpu with a batch sweep",
             gpu_minutes=3.0, smoke_minutes=0.3, run=part_bench_models, needs=("2-prune",)),
        Part("4-published", "resnet56 pruned to Li et al.'s and Torch-Pruning's MAC reductions",
             gpu_minutes=2.5, smoke_minutes=0.3, run=part_published, resumable=True, needs=("0-data", "1-baselines"),
             outputs=published_outputs),
        Part("5-ensemble", "3 pruned models voting against the unpruned resnet18",
             gpu_minutes=1.0, smoke_minutes=0.1, run=part_ensemble, needs=("2-prune", "4-published")),
        Part("6a-serve-options", "the service's runtime options (cuDNN, batch shapes, model threads) measured on its model",
             gpu_minutes=1.0, smoke_minutes=0.1, run=part_serve_options, needs=("2-prune",)),
        Part("6-service", "bentoml serve on the GPU, workers 1/4/16, /classify and /classify_batch vs raw ORT",
             gpu_minutes=5.0, smoke_minutes=0.4, run=part_service, needs=("0-data", "2-prune")),
        Part("7-tests", "pytest (the whole suite) and pytest -m gpu",
             gpu_minutes=5.0, smoke_minutes=0.2, run=part_tests),
    ]

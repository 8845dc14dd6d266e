"""The parts of ``bench campaign`` (issue 21: the GPU evidence in one 15-minute device lease)
and the two profiles they run with.

Each part is a :class:`bench.campaign.Part`; a new part is one more entry in :func:`parts` plus a
function here. Every figure comes from a file a command wrote (a run's manifest, a ``bench``
results.json, pytest's output); nothing is estimated.

Profiles: ``gpu`` (CIFAR-10 on an H100/H200, at most 6.5 minutes in one call) and ``smoke`` (the
same sequence on the CPU on a few images per class, tiny epochs and sweeps, under a minute)."""
from __future__ import annotations

import json
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.rundir import atomic_write_json, atomic_write_text

from .campaign import Context, Part, PartFailed, PartSkipped

# --- profiles ----------------------------------------------------------------------------------
# the files whose tests carry @pytest.mark.gpu (test_container.py's need Docker, not a GPU)
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_serve.py", "tests/test_serve_gpus.py"]

GPU = {
    "profile": "gpu",
    "device": "cuda",
    "model": {"name": "resnet56", "args": ["--arch", "resnet56"]},
    # from scratch, data held on the GPU (AMP and channels_last are compress's defaults on CUDA)
    "train": ["--weights", "none", "--device", "cuda", "--data-on-device", "on", "--batch-size", "512",
              "--optimizer", "sgd", "--sgd-lr", "0.2", "--weight-decay", "5e-4", "--label-smoothing", "0.1",
              "--patience", "0", "--aug-rotation", "0", "--aug-color-jitter", "0", "--aug-scale-min", "0.6",
              "--seed", "0", "--epochs", "10"],
    "prune": ["--prune-steps", "2", "--target-macs", "0.5", "--retrain-epochs", "3", "--retrain-lr", "0.02",
              "--scope", "global", "--round-to", "8", "--distill-weight", "0.5", "--precisions", "fp32,fp16",
              "--timing-seconds", "0.5"],
    "bench": ["--backends", "ort-cuda", "--cuda-graphs", "--precisions", "fp32,fp16", "--batch-sizes",
              "1,16,64,256,1024", "--no-accuracy", "--warmup", "3", "--rounds", "5", "--min-seconds", "0",
              "--max-seconds", "1"],
    "saturation": 0.9,  # saturating batch: the smallest reaching 90% of the best throughput
    "serve": {"provider": "cuda", "max_batch_size": 64, "images": 64, "start_timeout": 90, "command_timeout": 90,
              "load": ["--concurrency", "1,8,64", "--requests", "20000", "--duration", "5"]},
    "tests": ["-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES],
    "grace_seconds": 10,
}

SMOKE = {
    **GPU,
    "profile": "smoke",
    "device": "cpu",
    "model": {"name": "resnet20", "args": ["--arch", "resnet20", "--input-size", "16"], "stands_for": "resnet56"},
    "train": ["--weights", "none", "--device", "cpu", "--data-on-device", "on", "--batch-size", "32",
              "--optimizer", "sgd", "--patience", "0", "--workers", "0", "--seed", "0", "--epochs", "1"],
    "subset": {"train": 6, "test": 3},  # images per class taken from --data
    # one pruning step, not two: each step costs ~10 s of export and parity checks on 2 cores
    "prune": ["--prune-steps", "1", "--target-macs", "0.5", "--retrain-epochs", "1", "--scope", "global",
              "--round-to", "8", "--distill-weight", "0.5", "--precisions", "fp32,fp16", "--timing-seconds", "0.1",
              "--latency-batch", "4"],
    "bench": ["--backends", "ort-cpu,torch-cpu", "--cuda-graphs", "--precisions", "fp32,fp16", "--batch-sizes",
              "1,4", "--no-accuracy", "--warmup", "1", "--rounds", "2", "--min-seconds", "0", "--max-seconds", "0.2"],
    "serve": {"provider": "cpu", "max_batch_size": 8, "images": 8, "start_timeout": 60, "command_timeout": 60,
              "load": ["--concurrency", "1,8", "--requests", "16", "--duration", "2"]},
    # the GPU tests (all skipped without CUDA: the smoke runs inside the suite on the CPU)
    "tests": ["-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
    "grace_seconds": 5,
}


def profile(smoke: bool) -> dict[str, Any]:
    return SMOKE if smoke else GPU


# --- helpers -----------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PartFailed(f"cannot read {path}: {exc}") from None


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


# --- the data ----------------------------------------------------------------------------------
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
        if shutil.which("tar"):  # GNU tar: 1.3 s for CIFAR-10's 60,000 JPEGs here, Python's tarfile 7.0 s
            finished = ctx.part_state.setdefault("finished", [])
            if "unpack" in finished:  # unpacked by an earlier call into a folder that is gone
                finished.remove("unpack")
            ctx.run("unpack", ["tar", "-xf", str(path), "-C", str(partial), "--no-same-owner"], timeout=300)
        else:
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
    raise UsageError("--data: the archive holds no train/ folder (ImageFolder layout: train/<class>/*, test/<class>/*)")


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




def data_dir(ctx: Context) -> Path:
    """The image folder (unpacked or subset once into the work folder), recorded in the state."""
    if not ctx.state.get("data_dir"):
        folder = resolve_data(ctx)
        ctx.state["data_dir"] = str(folder.resolve())
        ctx.save()
    return Path(ctx.state["data_dir"])


def count_images(folder: Path) -> dict[str, int]:
    return {split: sum(1 for p in (folder / split).rglob("*") if p.is_file())
            for split in ("train", "test", "val") if (folder / split).is_dir()}


# --- part a: the machine and the GPU tests ------------------------------------------------------
def ort_probe(ctx: Context) -> dict[str, Any]:
    """Whether ONNX Runtime's CUDA provider really runs: a one-conv ONNX model in a session
    asked for CUDA first, ``session.get_providers()[0]`` read back (ORT falls back to the CPU
    silently)."""
    import onnx
    from onnx import TensorProto, helper

    if not ctx.smoke:
        import torch  # noqa: F401  (onnxruntime-gpu finds cuDNN/cuBLAS of torch's CUDA wheels once torch is loaded)
    import onnxruntime as ort

    from compress.runtime.sessions import SessionSettings, create_session, cuda_unavailable_reason

    path = ctx.work / "probe.onnx"
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.01] * 108)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime 1.2x-1.3x reads (onnx itself writes the newest)
    onnx.save(model, str(path))
    reason = "smoke: the CPU only" if ctx.smoke else cuda_unavailable_reason()
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
                           "cuda_unavailable_reason": reason}
    try:
        session, in_use = create_session(path, SessionSettings("cpu" if ctx.smoke else "auto"))
        out.update(session_providers=session.get_providers(), provider_in_use=in_use,
                   cuda_provider_loaded=session.get_providers()[0] == "CUDAExecutionProvider")
    except Exception as exc:  # onnxruntime's own errors: reported, not raised
        out.update(session_providers=None, cuda_provider_loaded=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return out


def pytest_result(log: Path) -> str:
    """pytest's closing line (``== 5 passed, 2 skipped in 3.2s ==``) from a log."""
    import re

    text = log.read_text(errors="replace") if log.is_file() else ""
    found = re.findall(r"^=*\s*((?:\d+ \w+,? ?)+in [\d.]+s(?: \([^)]*\))?)\s*=*$", text, flags=re.MULTILINE)
    return found[-1].strip() if found else "no pytest result line (see the log)"


def pytest_progress(log: Path) -> dict[str, int]:
    """Outcomes so far in a ``pytest -v`` log (one ``PASSED``/``FAILED``/... per test line)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts: dict[str, int] = {}
    for outcome in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return counts


def progress_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no test finished"


def part_machine(ctx: Context) -> dict[str, Any]:
    from compress.runtime.machine import machine_info

    out: dict[str, Any] = {"machine": machine_info(), "ort": ort_probe(ctx)}
    ctx.part_state["summary_so_far"] = out
    if shutil.which("nvidia-smi"):
        ctx.run("nvidia-smi", ["nvidia-smi"], timeout=30, check=False)
        out["nvidia_smi"] = (ctx.out / "logs" / ctx.part.name / "nvidia-smi.log").read_text(errors="replace")[-4000:]
    else:
        out["nvidia_smi"] = "nvidia-smi not found"
    tests = ctx.python(*ctx.settings["tests"])
    log = ctx.out / "logs" / ctx.part.name / "pytest-gpu.log"
    code = ctx.run("pytest-gpu", tests, check=False)
    out["tests"] = {"command": ctx.shown(tests), "exit_code": code, "result": pytest_result(log),
                    "outcomes": pytest_progress(log)}
    write_machine(ctx, out)
    return out


def machine_partial(ctx: Context) -> dict[str, Any]:
    """Cut off (the tests ran past the budget): the machine as probed, the tests' outcomes so far."""
    out = dict(ctx.part_state.get("summary_so_far") or {})
    log = ctx.out / "logs" / ctx.part.name / "pytest-gpu.log"
    out["tests"] = {"command": ctx.shown(ctx.python(*ctx.settings["tests"])), "exit_code": None,
                    "result": f"cut off at the budget; so far {progress_text(pytest_progress(log))}",
                    "outcomes": pytest_progress(log)}
    if "ort" in out:
        write_machine(ctx, out)
    else:
        out["line"] = "cut off before the machine was probed"
    return out


def write_machine(ctx: Context, out: dict[str, Any]) -> None:
    ort, machine, tests = out["ort"], out["machine"], out.get("tests") or {}
    gpu = machine.get("gpu") or {}
    out["line"] = (f"{gpu.get('name', 'no GPU')}; ORT {ort['onnxruntime']} session providers "
                   f"{ort.get('session_providers')} (CUDA provider {'loaded' if ort.get('cuda_provider_loaded') else 'NOT loaded'}"
                   f"{'' if ort.get('cuda_provider_loaded') else ': ' + str(ort.get('cuda_unavailable_reason') or ort.get('error'))}); "
                   f"pytest -m gpu: {tests.get('result', 'not run')}")
    versions = machine.get("versions") or {}
    rows = ["| fact | value |", "|---|---|",
            f"| GPU | {gpu.get('name', '-')} ({gpu.get('memory_gib', '-')} GiB), driver {gpu.get('driver', '-')}, "
            f"CUDA {gpu.get('cuda', '-')} |",
            f"| CPU | {machine.get('cpu', '-')} |",
            f"| libraries | {', '.join(f'{k} {v}' for k, v in versions.items()) or '-'} |",
            f"| ORT available providers | {', '.join(ort['available_providers'])} |",
            f"| ORT session providers (`session.get_providers()`) | {ort.get('session_providers')} |",
            f"| CUDA provider really loaded | {'yes' if ort.get('cuda_provider_loaded') else 'NO: ' + str(ort.get('cuda_unavailable_reason') or ort.get('error'))} |",
            f"| `{tests.get('command', 'pytest -m gpu')}` | {tests.get('result', 'not run')} |"]
    write_part_files(ctx, out, ["The machine as the evidence ran on it, ONNX Runtime's CUDA provider probed on a "
                                "one-conv model, and the suite's GPU tests.", "", *rows, "", "```",
                                out.get("nvidia_smi", "").strip(), "```"])


# --- part c: CIFAR-10 on the GPU ---------------------------------------------------------------
def train_dir(ctx: Context) -> Path:
    return ctx.work / "runs" / ctx.settings["model"]["name"]


def part_train(ctx: Context) -> dict[str, Any]:
    """``compress run`` from scratch: fine-tune, 2 pruning steps with retraining, fp32 + fp16,
    data held on the device; accuracy per step, wall time and images/s per epoch."""
    started = time.monotonic()
    folder = data_dir(ctx)
    ctx.part_state["data_seconds"] = round(time.monotonic() - started, 1)
    spec = ctx.settings["model"]
    ctx.run("run", ctx.python("-m", "compress", "run", "--data", str(folder), "--out", str(train_dir(ctx)),
                              *spec["args"], *ctx.settings["train"], *ctx.settings["prune"]))
    return train_summary(ctx, cut_off=False)


def train_summary(ctx: Context, cut_off: bool) -> dict[str, Any]:
    """What the run's manifest says: per step accuracy and MACs, per epoch seconds and images/s."""
    path = train_dir(ctx) / "manifest.json"
    if not path.is_file():
        return {"line": "cut off before the run wrote its manifest" if cut_off else "no manifest"}
    manifest = read_json(path)
    base = next((s for s in manifest["steps"] if s["step"] == 0), None)
    epochs: list[dict[str, Any]] = []
    finetune = manifest.get("stages", {}).get("finetune", {})
    for h in finetune.get("history") or []:
        epochs.append({"stage": "fine-tune", **epoch_row(h)})
    steps = []
    for s in manifest["steps"]:
        retrain = (s.get("retrain") or {})
        for h in retrain.get("history") or []:
            epochs.append({"stage": f"retrain step {s['step']}", **epoch_row(h)})
        steps.append({"step": s["step"], "accuracy": s["accuracy"], "macs": s["macs"], "params": s["params"],
                      "macs_ratio": s["macs"] / base["macs"] if base else None,
                      "fp16_accuracy": ((s.get("variants") or {}).get("fp16") or {}).get("accuracy"),
                      "train_seconds": retrain.get("seconds") if s["step"] else finetune.get("seconds")})
    images = count_images(Path(ctx.state["data_dir"])) if ctx.state.get("data_dir") else {}
    rates = [e["images_per_s"] for e in epochs if e.get("images_per_s")]
    out = {"model": ctx.settings["model"]["name"], "run_dir": str(train_dir(ctx)), "images": images,
           "data_seconds": ctx.part_state.get("data_seconds"), "device": finetune.get("device"),
           "data_on_device": finetune.get("data_on_device"), "steps": steps, "epochs": epochs,
           "median_images_per_s": sorted(rates)[len(rates) // 2] if rates else None, "cut_off": cut_off}
    out["line"] = (f"{out['model']}: " + ", ".join(f"step {s['step']} top-1 {s['accuracy']:.4f} ({s['macs_ratio']:.0%} MACs)"
                                                    for s in steps)
                   + (f"; {len(epochs)} epochs, median {out['median_images_per_s']:.0f} images/s" if rates else "")
                   + ("; CUT OFF at the budget" if cut_off else ""))
    rows = ["| step | MACs kept | top-1 | fp16 top-1 | training s |", "|---|---|---|---|---|",
            *[f"| {s['step']} | {s['macs_ratio']:.1%} | {s['accuracy']:.4f} | "
              f"{fmt_acc(s['fp16_accuracy'])} | {s['train_seconds']} |" for s in steps],
            "", "| stage | epoch | wall s | images | images/s | val top-1 |", "|---|---|---|---|---|---|",
            *[f"| {e['stage']} | {e['epoch']} | {e.get('seconds', '-')} | {e.get('images', '-')} | "
              f"{e.get('images_per_s', '-')} | {e['val_accuracy']:.4f} |" for e in epochs]]
    write_part_files(ctx, out, [f"`compress run` of {out['model']} from scratch on "
                                f"{images.get('train', 0)} training images, data held on `{out['device']}`, "
                                f"then {len(steps) - 1} pruning step(s) with retraining, fp32 + fp16 (data ready in "
                                f"{out['data_seconds']} s).", "", *rows])
    return out


def epoch_row(history: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": history.get("epoch"), "seconds": history.get("train_seconds"), "images": history.get("train_images"),
            "images_per_s": history.get("train_images_per_second"), "val_accuracy": history.get("val_accuracy", 0.0)}


def train_partial(ctx: Context) -> dict[str, Any]:
    return train_summary(ctx, cut_off=True)


def finished_steps(ctx: Context) -> list[int]:
    """The steps of the training run that have their ONNX file (what parts b and d can use)."""
    path = train_dir(ctx) / "manifest.json"
    if not path.is_file():
        raise PartSkipped("the training part left no run (no manifest.json)")
    steps = [s["step"] for s in read_json(path)["steps"] if (train_dir(ctx) / s["onnx"]).is_file()]
    if not steps:
        raise PartSkipped("the training part left no exported step")
    return steps


# --- part b: ORT CUDA against PyTorch eager and CUDA graphs ------------------------------------
def part_bench(ctx: Context) -> dict[str, Any]:
    steps = finished_steps(ctx)
    target = ctx.part_out / "models"
    ctx.run("models", ctx.python("-m", "bench", "models", str(train_dir(ctx)), "--steps", ",".join(map(str, steps)),
                                 *ctx.settings["bench"], "--out", str(target)))
    doc = read_json(target / "results.json")
    combos = sorted({(r["backend"], r["precision"]) for r in doc["results"]})
    table: list[dict[str, Any]] = []
    for backend, precision in combos:
        for step in steps:
            found = saturation(doc, backend, step, precision, ctx.settings["saturation"])
            if not found:
                continue
            rows = {r["batch"]: r for r in doc["results"] if r["backend"] == backend and r["step"] == step
                    and r["precision"] == precision}
            table.append({"backend": backend, "precision": precision, "step": step, **found,
                          "speedup_by_batch": {str(b): r["speedup"] for b, r in sorted(rows.items())},
                          "device": next(iter(rows.values()))["device"]})
    best = max((t for t in table if t["step"] == max(steps)), key=lambda t: t["peak_images_per_s"], default=None)
    out = {"steps": steps, "results": str(target / "results.json"), "table": table,
           "skipped": doc.get("skipped", []), "best_pruned": best}
    out["line"] = (f"best pruned step {best['step']}: {best['peak_images_per_s']:.0f} images/s on {best['backend']} "
                   f"{best['precision']} at batch {best['peak_batch']}, {best['speedup_by_batch'][str(best['peak_batch'])]:.2f}x "
                   f"step 0 fp32; saturates at batch {best['saturating_batch']}" if best else "nothing measured")
    if out["skipped"]:
        out["line"] += "; skipped: " + ", ".join(sorted({f"{s['backend']} {s['precision']}" for s in out["skipped"]}))
    batches = sorted({int(b) for t in table for b in t["images_per_s_by_batch"]})
    rows = [f"| backend | precision | step | {' | '.join(f'b{b} img/s (x)' for b in batches)} | saturates at |",
            "|---|---|---|" + "---|" * len(batches) + "---|"]
    for t in table:
        cells = [f"{t['images_per_s_by_batch'][str(b)]:.0f} ({t['speedup_by_batch'][str(b)]:.2f}x)"
                 if str(b) in t["images_per_s_by_batch"] else "-" for b in batches]
        rows.append(f"| {t['backend']} | {t['precision']} | {t['step']} | {' | '.join(cells)} | {t['saturating_batch']} |")
    skipped = [f"- {s['backend']} {s['precision']}: {s['reason']}" for s in out["skipped"]]
    write_part_files(ctx, out, ["`bench models` on every finished step: ONNX Runtime CUDA (IO binding, cuDNN conv "
                                "algo search HEURISTIC), PyTorch eager and CUDA graphs, fp32 and fp16; images/s by "
                                "batch with the speed-up against step 0 fp32 of the same backend, measured in the "
                                f"same run; 'saturates at' = the smallest batch reaching "
                                f"{ctx.settings['saturation']:.0%} of the best.", "", *rows, "",
                                *(["Skipped:", *skipped] if skipped else [])])
    return out


# --- part d: the service ---------------------------------------------------------------------
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
        self.grace = ctx.settings["grace_seconds"] / 2  # stopped within the call's reserve even at its end

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
        stop_process_group(self.process, self.grace)
        for pid in self.children:  # BentoML's workers may run in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._handle.close()


def last_tag(log: Path) -> str:
    """The tag ``compress register`` printed (its last output line)."""
    from .campaign import last_line

    tag = last_line(log)
    if ":" not in tag or " " in tag:
        raise PartFailed(f"compress register printed no model tag (log: {log})")
    return tag


def serve_provider(asked: str, override: str | None, ort_probe: dict[str, Any]) -> str:
    """The service's SERVE_PROVIDER: ``asked`` (the profile's), unless ORT's CUDA provider is
    known to be missing (``override``) or the machine part's session did not really load it
    (ORT falls back to the CPU silently; the service refuses SERVE_PROVIDER=cuda then)."""
    if override:
        return override
    if asked == "cuda" and ort_probe and not ort_probe.get("cuda_provider_loaded"):
        return "cpu"
    return asked


def part_service(ctx: Context) -> dict[str, Any]:
    steps = finished_steps(ctx)
    step = max(steps)
    settings = ctx.settings["serve"]
    provider = serve_provider(settings["provider"], ctx.settings.get("serve_provider_override"),
                              ctx.summary_of("machine").get("ort") or {})
    home = ctx.work / "bentoml"
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    ctx.run("register", ctx.python("-m", "compress", "register", str(train_dir(ctx)), "--step", str(step), "--name",
                                   f"evidence-{ctx.settings['model']['name']}"), env=env)
    tag = last_tag(ctx.out / "logs" / ctx.part.name / "register.log")
    images = serve_images(ctx, settings["images"])
    service_env = {**env, "SERVE_MODELS": tag, "SERVE_WORKERS": "1", "SERVE_PROVIDER": provider,
                   "SERVE_MAX_BATCH_SIZE": str(settings["max_batch_size"])}
    service = Service(ctx, service_env, ctx.out / "logs" / ctx.part.name / "serve.log")
    ctx.record(service.command)
    target = ctx.part_out / "load"
    try:
        ctx.echo(f"  $ {service.command}")
        ready = service.wait_ready(settings["start_timeout"], ctx.remaining())
        ctx.echo(f"    ready in {ready:.1f} s at {service.url}")
        ctx.part_state["startup_seconds"] = round(ready, 1)
        ctx.run("load", ctx.python("-m", "bench", "serve", service.url, "--images", str(images), *settings["load"],
                                   "--baseline", f"{train_dir(ctx)}:{step}", "--baseline-provider", provider,
                                   "--timeout", "30", "--out", str(target)), timeout=settings["command_timeout"])
    finally:
        service.stop()
    doc = read_json(target / "results.json")
    base = doc.get("baseline") or {}
    levels = [{"concurrency": lv["concurrency"], "requests_per_s": lv["requests_per_s"], "errors": lv["errors"],
               "p50_ms": (lv.get("latency") or {}).get("p50_ms"), "p99_ms": (lv.get("latency") or {}).get("p99_ms"),
               "model_mean_batch": lv.get("model_mean_batch"), "fraction_of_in_process_b1": lv.get("fraction_of_in_process_b1"),
               "gpu_util_pct": (lv.get("gpu") or {}).get("mean_util_pct")} for lv in doc["levels"]]
    out = {"tag": tag, "step": step, "provider": provider, "startup_seconds": ctx.part_state.get("startup_seconds"),
           "levels": levels, "in_process": {b: v.get("images_per_s") for b, v in (base.get("batches") or {}).items()},
           "service_mean_batch_size": base.get("service_mean_batch_size"),
           "gpu_utilisation": doc.get("gpu_utilisation")}
    top = max(levels, key=lambda lv: lv["requests_per_s"])
    out["line"] = (f"bentoml serve ({provider}) step {step}: " + ", ".join(
        f"c{lv['concurrency']} {lv['requests_per_s']:.0f} req/s p50 {fmt_ms(lv['p50_ms'])} p99 {fmt_ms(lv['p99_ms'])}"
        for lv in levels) + f"; in-process batch 1 {fmt_num(out['in_process'].get('1'))} images/s"
        + (f"; GPU {top['gpu_util_pct']:.0f}% at c{top['concurrency']}" if top["gpu_util_pct"] is not None else
           f"; GPU utilisation {((doc.get('gpu_utilisation') or {}).get('skipped') or 'not read')}"))
    rows = ["| connections | requests/s | p50 ms | p99 ms | errors | model mean batch | of in-process batch 1 | GPU util % |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {lv['concurrency']} | {lv['requests_per_s']:.1f} | {fmt_ms(lv['p50_ms'])} | {fmt_ms(lv['p99_ms'])} | "
              f"{lv['errors']} | {fmt_num(lv['model_mean_batch'])} | "
              f"{fmt_pct(lv['fraction_of_in_process_b1'])} | "
              f"{fmt_num(lv['gpu_util_pct'])} |" for lv in levels],
            "", "In-process (same model, same run): " + ", ".join(f"batch {b}: {fmt_num(v)} images/s"
                                                                for b, v in out["in_process"].items())]
    write_part_files(ctx, out, [f"A real `bentoml serve` (`SERVE_PROVIDER={provider}`, one worker, adaptive batching "
                                f"up to {settings['max_batch_size']}) serving `{tag}` (step {step}), ready in "
                                f"{out['startup_seconds']} s; `bench serve` on /classify with the same model timed "
                                "in-process in the same run (`--baseline`); `load/` has report.md, results.json and "
                                "load.png.", "", *rows])
    return out


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def fmt_num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2f}"


# --- part e: the summary ----------------------------------------------------------------------
def part_summary(ctx: Context) -> dict[str, Any]:
    """Nothing to run: the evidence (README.md, evidence.json) is written after every part; this
    part names the folder the results go to in the repository."""
    machine = ctx.state.get("machine") or {}
    gpu = ((machine.get("gpu") or {}).get("name") or "").lower()
    kind = "h200" if "h200" in gpu else "h100" if "h100" in gpu else "gpu" if gpu else "cpu"
    folder = f"bench/results/{kind}-evidence" if not ctx.smoke else "(smoke: not committed)"
    done = {n: r.get("status") for n, r in ctx.state["parts"].items() if n != ctx.part.name}
    return {"commit_to": folder, "statuses": done,
            "line": f"commit to {folder}; parts: " + ", ".join(f"{n} {s}" for n, s in done.items())}


# --- the list ---------------------------------------------------------------------------------
def parts() -> list[Part]:
    """The evidence, in the order it runs (c before b and d: they measure its models). Budgets
    add up to 365 s on the GPU (``--max-minutes 6.5`` with its 25 s reserve); the smoke's are caps for a
    shared 2-core machine (102 s; it takes under a minute when the machine is quiet)."""
    return [
        Part("machine", "a", "the machine (nvidia-smi, versions, ORT's CUDA provider really loaded) and pytest -m gpu",
             budget=75, smoke_budget=15, run=part_machine, partial=machine_partial,
             plan=lambda s: "nvidia-smi; a one-conv ONNX session asked for CUDA first: session.get_providers()[0]; "
                            "python " + " ".join(s["tests"])),
        Part("train", "c", "CIFAR-10 on the GPU: resnet56 from scratch, 2 pruning steps with retraining, fp32 + fp16",
             budget=140, smoke_budget=40, run=part_train, partial=train_partial,
             plan=lambda s: "the data unpacked into the work folder; python -m compress run --data DATA --out RUN "
                            + " ".join([*s["model"]["args"], *s["train"], *s["prune"]])),
        Part("bench", "b", "ORT CUDA (IO binding, HEURISTIC) vs PyTorch eager and CUDA graphs, fp32 + fp16, batch sweep",
             budget=75, smoke_budget=20, run=part_bench, needs=("train",),
             plan=lambda s: "python -m bench models RUN --steps STEPS " + " ".join(s["bench"])
                            + ": speed-ups vs step 0 in the same run, where throughput saturates"),
        Part("service", "d", "bentoml serve with the CUDA provider, bench serve at 1, 8 and 64 connections",
             budget=70, smoke_budget=25, run=part_service, needs=("train",),
             plan=lambda s: f"compress register RUN --step LAST; python -m bentoml serve (SERVE_PROVIDER="
                            f"{s['serve']['provider']}, SERVE_MAX_BATCH_SIZE={s['serve']['max_batch_size']}); "
                            f"python -m bench serve URL {' '.join(s['serve']['load'])} --baseline RUN:LAST "
                            f"--baseline-provider {s['serve']['provider']} (p50/p99, GPU utilisation)"),
        Part("summary", "e", "one summary (README.md + evidence.json) fit to commit under bench/results/",
             budget=5, smoke_budget=2, run=part_summary,
             plan=lambda s: "evidence.json + README.md (also rewritten after every part, with the bundle)"),
    ]

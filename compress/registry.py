"""``compress register``: put one step of a run into the BentoML model store.

The stored model is what the HTTP service (``serve/``) loads: the step's ONNX files (fp32 and
every precision variant the run made) and, as metadata, everything the service needs besides
the file (class names, preprocessing, tensor names) and the figures a user picks a model by
(accuracy, MACs, parameters, measured latency). The service never reads the run directory,
so a registered model keeps working after the run is moved or deleted."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError
from .manifest import StepRecord, manifest_arch
from .rundir import require_manifest
from .runtime.precisions import VARIANT_FILES

# The ONNX tensor names fixed by compress/export.py (kept literal here: importing export.py
# would pull in torch just to read two constants).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ACCURACY_TOLERANCE = 0.01  # "within 1 point of step 0's accuracy"
_TAG_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def sanitize_name(text: str) -> str:
    """A valid BentoML model name from a run directory name: lowercase, runs of other
    characters become '-', trimmed to 63 characters, starting and ending alphanumeric."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower())[:63].strip("._-")
    return name or "model"


def check_name(name: str) -> str:
    """``--name`` as given, or :class:`UsageError` saying what a valid name looks like."""
    if not _TAG_NAME.match(name):
        raise UsageError(f"--name {name!r} is not a valid model name: use 1-63 lowercase letters, digits, '.', '_' "
                         f"or '-', starting and ending with a letter or digit (e.g. {sanitize_name(name)!r})")
    return name


def choose_step(manifest: dict[str, Any]) -> int:
    """The step registered when ``--step`` is not given: the report's recommended step, else
    the exported step with the fewest MACs within 1 point of step 0's accuracy."""
    steps = {s["step"]: s for s in manifest.get("steps", [])}
    recommended = (manifest.get("report") or {}).get("recommended_step")
    if recommended in steps:
        return int(recommended)
    if 0 not in steps:
        raise UsageError("the run has no step 0 yet; finish it with `compress run` first")
    floor = steps[0]["accuracy"] - ACCURACY_TOLERANCE - 1e-9
    candidates = [s for s in steps.values() if s.get("onnx") and s["accuracy"] >= floor]
    if not candidates:
        raise UsageError("no step of the run is exported to ONNX yet; run `compress export RUN_DIR` first")
    return int(min(candidates, key=lambda s: (s["macs"], s["step"]))["step"])


def step_entry(manifest: dict[str, Any], step: int) -> dict[str, Any]:
    entry = next((s for s in manifest.get("steps", []) if s["step"] == step), None)
    if entry is None:
        known = ", ".join(str(s["step"]) for s in manifest.get("steps", [])) or "none"
        raise UsageError(f"--step {step}: the run has no such step (steps: {known})")
    return entry


def variant_files(run_dir: Path, entry: dict[str, Any]) -> dict[str, Path]:
    """Every precision variant of a step and its file (fp32 first), each checked to exist."""
    record = StepRecord.from_dict(entry)
    files = {}
    for precision in record.variants:
        path = record.variant_path(run_dir, precision)
        if not path.is_file():
            raise UsageError(f"step {entry['step']}: the {precision} file {path} is missing; run "
                             f"`compress export {run_dir}` (or `compress quantize`) again")
        files[precision] = path
    return files


def _latency(manifest: dict[str, Any], step: int) -> dict[str, float]:
    """The step's measured latency figures from the run's report (empty before `report`)."""
    for row in (manifest.get("report") or {}).get("steps", []):
        if row.get("step") == step:
            return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    return {}


def build_metadata(run_dir: Path, manifest: dict[str, Any], entry: dict[str, Any],
                   precisions: list[str]) -> dict[str, Any]:
    """What the service reads from the store: classes, preprocessing, files, metrics, and per
    precision variant its accuracy and agreement with fp32."""
    steps = {s["step"]: s for s in manifest["steps"]}
    base = steps.get(0, entry)
    files = {p: VARIANT_FILES[p] for p in precisions}
    variants = StepRecord.from_dict(entry).variants
    metadata: dict[str, Any] = {
        "format": 1,
        "producer": "resnet-compress",
        "classes": list(manifest["dataset"]["classes"]),
        "preprocessing": dict(manifest["preprocessing"]),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "files": files,
        "arch": manifest_arch(manifest),
        "step": int(entry["step"]),
        "accuracy": float(entry["accuracy"]),
        "accuracy_step0": float(base["accuracy"]),
        "macs": int(entry["macs"]),
        "params": int(entry["params"]),
        "macs_ratio": entry["macs"] / base["macs"] if base.get("macs") else 1.0,
        "params_ratio": entry["params"] / base["params"] if base.get("params") else 1.0,
        "latency": _latency(manifest, int(entry["step"])),
        "run_dir": str(run_dir.resolve()),
    }
    if entry.get("parity"):
        metadata["parity"] = {k: v for k, v in entry["parity"].items() if isinstance(v, (int, float))}
    metadata["variants"] = {p: {k: v for k, v in variants[p].to_dict().items()  # the store takes no None values
                                if k in ("accuracy", "top1_agreement", "max_abs_diff", "accuracy_drop", "flagged", "bytes",
                                         "format") and v is not None}
                            for p in precisions if p in variants}
    return json.loads(json.dumps(metadata))  # plain JSON types only (the store validates them)


def model_store(bentoml_home: Path | str | None = None) -> Any:
    """The model store under ``BENTOML_HOME`` (read now, not when bentoml was first imported,
    so a caller's environment change takes effect)."""
    from bentoml._internal.models import ModelStore

    home = Path(bentoml_home or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()
    (home / "models").mkdir(parents=True, exist_ok=True)
    return ModelStore(str(home / "models"))


def register(run_dir: Path, *, step: int | None = None, name: str | None = None,
             bentoml_home: Path | str | None = None) -> str:
    """Store ``step`` of ``run_dir`` in the BentoML model store; returns the tag (``name:version``)."""
    import bentoml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    manifest = require_manifest(run_dir)
    name = check_name(name) if name is not None else sanitize_name(run_dir.resolve().name)
    chosen = choose_step(manifest) if step is None else step
    entry = step_entry(manifest, chosen)
    if not entry.get("onnx"):
        raise UsageError(f"step {chosen} is not exported to ONNX yet; run `compress export {run_dir}` first")
    files = variant_files(run_dir, entry)
    metadata = build_metadata(run_dir, manifest, entry, list(files))
    labels = {"source": "resnet-compress", "arch": str(metadata["arch"]), "step": str(chosen),
              "run": sanitize_name(run_dir.resolve().name)}
    with bentoml.models.create(name, labels=labels, metadata=metadata,
                               _model_store=model_store(bentoml_home)) as model:
        for precision, path in files.items():
            shutil.copyfile(path, model.path_of(VARIANT_FILES[precision]))
    return str(model.tag)

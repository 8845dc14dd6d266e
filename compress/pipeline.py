"""The stages of a run and their bookkeeping in ``RUN_DIR/manifest.json``.

Layout of a run directory::

    manifest.json                 the contract (dataset, config, versions, steps, report)
    steps/step_00/model.pt        fine-tuned checkpoint (step 0)
    steps/step_00/model.onnx      its ONNX export
    steps/step_00/train_state.pt  per-epoch training state (resume inside a stage)
    steps/step_0K/pruned.pt       step K right after pruning, before retraining
    report.md, pareto.png         accuracy vs latency

Every stage is idempotent: it skips what the manifest says is finished and redoes the rest.
The manifest is rewritten (atomically) after each finished unit of work, so ``kill -9`` at any
moment loses at most the unit in progress.

Under torchrun every process runs the same stages: training in all of them (DDP), everything
that writes in rank 0 alone (``@distributed.main_process_only``), the others waiting and then
taking rank 0's manifest and reading the checkpoints it wrote."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from . import distributed
from . import export as onnx_export
from . import models
from .config import RunConfig, config_differences
from .data import SCAN_RECORD, DataBundle, Preprocessing, class_weights, make_loaders
from .errors import UsageError
from .pruning import conv_out_widths, count_macs_params, prune_to_macs, step_targets
from .rundir import MANIFEST, read_manifest, relative, write_manifest
from .runtime.machine import library_versions
from .runtime.precisions import PRECISIONS, VARIANT_FILES
from .training import evaluate, fit

console = Console(stderr=True)
def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``; under torchrun ``cuda`` is this process's GPU, ``cuda:LOCAL_RANK``."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.local_device(torch.device(name))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "steps" / f"step_{step:02d}"


@dataclass
class Run:
    """A run directory with its resolved config, data and manifest, loaded once per command."""

    run_dir: Path
    config: RunConfig
    manifest: dict[str, Any]
    data: DataBundle
    device: torch.device
    imported: Any = field(default=None, repr=False)  # --model: the file read when the run was opened
    _training_loaders: tuple[Any, Any] | None = field(default=None, init=False, repr=False)
    _loaders_made: list[Any] = field(default_factory=list, init=False, repr=False)

    # --- bookkeeping -------------------------------------------------------------------------
    def save(self) -> None:
        self._record_decode_failures()
        if distributed.is_main():
            write_manifest(self.run_dir, self.manifest)

    def _record_decode_failures(self) -> None:
        """Files that passed the scan but failed to decode in a loader of this command join
        ``dataset.skipped_files`` (``"stage": "decode"``), with a warning the first time."""
        found = [{"path": Path(os.path.relpath(path, self.data.source)).as_posix(), "reason": reason, "stage": "decode"}
                 for loader in self._loaders_made for path, reason in getattr(loader, "skipped", {}).items()]
        new = _add_decode_failures(self.manifest["dataset"], found)
        if new:
            console.print(f"[yellow]warning: {len(new)} file(s) failed to decode and were left out of their batches "
                          f"(listed in manifest.json dataset.skipped_files), e.g. "
                          f"{escape(new[0]['path'])}: {escape(new[0]['reason'])}[/]")

    def step_entry(self, step: int) -> dict[str, Any] | None:
        return next((s for s in self.manifest["steps"] if s["step"] == step), None)

    def put_step(self, entry: dict[str, Any]) -> None:
        steps = [s for s in self.manifest["steps"] if s["step"] != entry["step"]] + [entry]
        self.manifest["steps"] = sorted(steps, key=lambda s: s["step"])
        self.save()

    @property
    def preprocessing(self) -> Preprocessing:
        return self.data.preprocessing

    def _architecture(self, field: str) -> str:
        """``field`` (arch, stem) as recorded by the import stage, else as read from ``--model``'s
        file in this process, else as configured."""
        imported = self.manifest["stages"].get("import")
        if imported:
            return imported["architecture"][field]
        return getattr(self.imported if self.imported is not None else self.config, field)

    @property
    def arch(self) -> str:
        """The architecture: ``--arch``, or with ``--model`` the one read from the file."""
        return self._architecture("arch")

    @property
    def stem(self) -> str:
        return self._architecture("stem")

    def _workers(self) -> int:
        if self.config.workers is not None:
            return self.config.workers
        # in-memory data needs no worker processes; the training processes of a node share its cores
        cores = (os.cpu_count() or 1) // distributed.world().local_world_size
        return 0 if self.data.layout == "embedded" else min(4, max(1, cores - 1))

    def loaders(self, *, sharded: bool = False) -> tuple[Any, Any]:
        """DataLoaders of CPU tensors (export, parity checks and measurements take these);
        ``sharded``: under torchrun, this rank's shards (training)."""
        shards = {"rank": distributed.world().rank, "world_size": distributed.world().world_size} \
            if sharded and distributed.active() else {}
        loaders = make_loaders(self.data, batch_size=self.config.batch_size, balance=self.config.balance,
                               seed=self.config.seed, workers=self._workers(), pin_memory=self.device.type == "cuda",
                               **shards)
        self._loaders_made.extend(loaders)
        return loaders

    @property
    def data_on_device(self) -> bool:
        from .device_data import use_device_data

        return use_device_data(self.config.data_on_device, self.data, self.device)

    def training_loaders(self) -> tuple[Any, Any]:
        """Loaders for training and evaluation: with ``--data-on-device`` the images decoded
        once onto the device (kept for the whole command), else like ``loaders()``; under
        torchrun this rank's shards (``--batch-size`` is per rank)."""
        if not self.data_on_device:
            return self.loaders(sharded=True)
        if self._training_loaders is None:
            from .device_data import device_loaders

            shards = {"rank": distributed.world().rank, "world_size": distributed.world().world_size} \
                if distributed.active() else {}
            started = time.perf_counter()
            self._training_loaders = device_loaders(
                self.data, self.config.augmentation(), self.device, batch_size=self.config.batch_size,
                balance=self.config.balance, seed=self.config.seed, workers=self._workers(), **shards)
            self._loaders_made.extend(self._training_loaders)
            console.print(f"[dim]data held on {self.device}: {len(self.data.train_labels)} + "
                          f"{len(self.data.val_labels)} images decoded in {time.perf_counter() - started:.1f} s[/]")
        for loader in self._training_loaders:
            loader.reseed(self.config.seed)
        return self._training_loaders

    def class_weight(self) -> torch.Tensor | None:
        if self.config.balance != "weights":
            return None
        return class_weights(self.data.train_labels, len(self.data.classes))

    def load_step_model(self, step: int) -> torch.nn.Module:
        entry = self.step_entry(step)
        if entry is None:
            raise UsageError(f"step {step} is not finished in {self.run_dir}")
        model, _ = models.load_checkpoint(self.run_dir / entry["checkpoint"])
        return model


def open_run(run_dir: Path, config: RunConfig | None, *, force: bool = False, device: str | None = None) -> Run:
    """Create or reopen a run directory.

    With ``config``: a new run is started, or an existing one is checked to have been made
    with the same options (``force`` wipes it and starts again). Without: the config
    recorded in the manifest is used (stage commands that take only RUN_DIR). ``device``
    overrides the config's (stage commands' ``--device``).

    Under torchrun the process group is set up here (NCCL for CUDA, gloo for the CPU); rank 0
    alone checks and writes the run directory, the other ranks then take its manifest and load
    the data themselves."""
    run_dir = Path(run_dir)
    if not distributed.launched():
        return _open_run(run_dir, config, force=force, device=device)
    distributed.setup(resolve_device(device or _device_option(run_dir, config)))
    opened = distributed.run_on_main(lambda: _open_run(run_dir, config, force=force, device=device))
    manifest = distributed.broadcast_object(opened.manifest if opened is not None else None)
    error = None
    if opened is None:
        try:
            opened = _join_run(run_dir, manifest, device)
        except BaseException as exc:  # noqa: BLE001 - every rank hears of it in settle()
            error = exc
    distributed.settle(error)
    console.quiet = not distributed.is_main()
    return opened


def _add_decode_failures(dataset: dict[str, Any], failures: list[dict[str, str]]) -> list[dict[str, str]]:
    """Add the files that failed to decode (``"stage": "decode"``) to ``dataset.skipped_files``,
    each once, and count them in ``decode_failures``; returns those that were new."""
    listed = {entry["path"] for entry in dataset["skipped_files"]}
    new = []
    for failure in failures:
        if failure["path"] not in listed:
            listed.add(failure["path"])
            new.append(failure)
    if new:
        dataset["skipped_files"] = sorted(dataset["skipped_files"] + new, key=lambda e: e["path"])
        dataset["decode_failures"] = sum(1 for e in dataset["skipped_files"] if e.get("stage") == "decode")
    return new


def _device_option(run_dir: Path, config: RunConfig | None) -> str:
    """The ``--device`` a command will use, known before the run is opened (it picks the backend)."""
    if config is not None:
        return config.device
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    return str((manifest or {}).get("config", {}).get("device", "auto"))


def _import_model(config: RunConfig) -> Any:
    """``--model FILE`` read and rebuilt, checked against ``--arch`` and the data's classes
    (known from the folder names, before any image is scanned): a model that cannot be used
    exactly as it is gets one line, never a silently replaced head."""
    from .architecture import load_model_file
    from .data_index import class_names

    imported = load_model_file(Path(config.model), trust_pickle=config.trust_pickle, key=config.checkpoint_key)
    if config.arch is not None and config.arch != imported.arch:
        raise UsageError(f"--arch {config.arch}: {config.model} holds a {imported.architecture.describe()}; "
                         "leave --arch out to use it as it is")
    classes = class_names(config.data, config.class_order())
    if classes and imported.num_classes != len(classes):
        raise UsageError(f"--model {config.model}: its head has {imported.num_classes} classes, the data has "
                         f"{len(classes)}; to train a new head on these classes, use --weights {config.model} "
                         f"--arch {imported.arch} instead")
    if classes and imported.classes not in (None, classes):
        raise UsageError(f"--model {config.model} was trained on classes {imported.classes}, the data has {classes}")
    return imported


def _check_weights_head(config: RunConfig) -> None:
    """``--weights FILE --epochs 0`` keeps the file's head as it is: refused when its size is
    not the data's class count (it would be replaced by an untrained one)."""
    from .checkpoints import read_checkpoint
    from .data_index import class_names

    classes = class_names(config.data, config.class_order())
    head = read_checkpoint(Path(config.weights), trust_pickle=config.trust_pickle, key=config.checkpoint_key,
                           option="--weights").state_dict.get("fc.weight")
    if classes and head is not None and head.shape[0] != len(classes):
        raise UsageError(f"--weights {config.weights} --epochs 0: the file's head has {head.shape[0]} classes, the data "
                         f"has {len(classes)}, so it would be replaced by an untrained one; train it (--epochs N)")


def _join_run(run_dir: Path, manifest: dict[str, Any], device: str | None) -> Run:
    """A rank other than 0: the run that rank 0 opened, with the data loaded here."""
    if not (run_dir / MANIFEST).is_file():
        import socket

        raise UsageError(f"rank {distributed.world().rank} on {socket.gethostname()} does not see {run_dir / MANIFEST} "
                         "that rank 0 wrote: --out must be on a filesystem that every node shares")
    config = RunConfig.from_manifest(manifest)
    return Run(run_dir, config, manifest, config.load_data(run_dir / SCAN_RECORD), resolve_device(device or config.device))


def _open_run(run_dir: Path, config: RunConfig | None, *, force: bool, device: str | None) -> Run:
    """``open_run`` in one process (rank 0 under torchrun)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} exists and is not a folder")
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    if config is None:
        if manifest is None:
            raise UsageError(f"{run_dir} is not a run directory (no manifest.json); start it with `compress run`")
        config = RunConfig.from_manifest(manifest)
    elif manifest is not None:
        differences = config_differences(manifest.get("config", {}), config.to_dict())
        if differences and not force:
            shown = ", ".join(f"{k} ({manifest['config'].get(k)!r} -> {config.to_dict().get(k)!r})" for k in differences[:4])
            raise UsageError(f"{run_dir} was made with other options: {shown}; use another --out, or --force to start over")
        if force:
            shutil.rmtree(run_dir)
            manifest = None
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise UsageError(f"--out {run_dir} exists, is not empty and is not a run directory; use another --out or --force")
    if config.model is not None and not Path(config.model).is_file():
        raise UsageError(f"--model {config.model}: no such file")
    if config.weights not in ("auto", "imagenet", "none") and not Path(config.weights).is_file():
        raise UsageError(f"--weights {config.weights}: no such file (use imagenet, none, auto or a state-dict file)")
    resolved_device = resolve_device(device or config.device)
    if config.target_speedup is not None and config.latency_backend == "ort-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or not torch.cuda.is_available():
            raise UsageError("--latency-backend ort-cuda: no CUDA device or ONNX Runtime CUDA provider on this machine")
    if config.target_speedup is not None and config.latency_backend == "openvino":
        from .runtime.openvino_models import openvino_unavailable_reason

        if openvino_unavailable_reason():
            raise UsageError(f"--latency-backend openvino: {openvino_unavailable_reason()}")
    step0_done = any(s["step"] == 0 for s in (manifest or {}).get("steps", []))
    imported = None  # read before the data scan and before anything is written
    if config.model is not None and not step0_done:
        imported = _import_model(config)
    elif config.weights not in ("auto", "imagenet", "none") and config.epochs == 0 and not step0_done:
        _check_weights_head(config)
    if config.weights == "imagenet" and config.model is None and not step0_done \
            and config.arch in models.TORCHVISION_ARCHS and not models.imagenet_weights_available(config.arch):
        models.imagenet_state_dict(config.arch)  # download now: offline, fail in seconds, before scanning the data
    data = config.load_data(run_dir / SCAN_RECORD if manifest is not None else None)
    if manifest is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": [], "stages": {}}
    if data.scan is not None and not data.scan.stats.get("reused"):
        data.scan.save(run_dir / SCAN_RECORD)
    decode_failures = [e for e in manifest.get("dataset", {}).get("skipped_files", []) if e.get("stage") == "decode"]
    manifest["dataset"] = data.summary()
    _add_decode_failures(manifest["dataset"], decode_failures)  # found by earlier commands; the scan cannot see them
    manifest["preprocessing"] = data.preprocessing.to_dict()
    manifest["config"] = config.to_dict()
    manifest["versions"] = library_versions()
    manifest["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    manifest.setdefault("world_size", distributed.world().world_size)  # then that of the latest training stage
    run = Run(run_dir, config, manifest, data, resolved_device, imported)
    run.save()
    return run


def _resolved_weights(config: RunConfig) -> tuple[str, str | None]:
    """The weights fine-tuning starts from, and for ``auto`` why (recorded in the manifest).
    ``auto``: ImageNet weights for a torchvision ResNet with its ImageNet stem, from the torch
    cache or downloaded; when they cannot be had, from scratch with a warning."""
    if config.weights != "auto":
        return config.weights, None
    if config.arch not in models.TORCHVISION_ARCHS:
        return "none", f"auto: there are no ImageNet weights for {config.arch}; trained from scratch"
    if config.stem != "imagenet":
        return "none", f"auto: --stem {config.stem} replaces the stem ImageNet weights were trained with; trained from scratch"
    try:
        models.imagenet_state_dict(config.arch)  # into the torch cache, for build_model
    except models.WeightsUnavailable as exc:
        note = f"auto: ImageNet weights unavailable, trained from scratch ({exc})"
        console.print(f"[yellow]warning: {escape(note)}[/]")
        return "none", note
    return "imagenet", "auto: ImageNet weights (torchvision)"


@distributed.main_process_only
def _record_step(run: Run, step: int, model: torch.nn.Module, accuracy: float, extra: dict[str, Any]) -> None:
    """Save the step's checkpoint and its manifest entry."""
    folder = step_dir(run.run_dir, step)
    checkpoint = folder / "model.pt"
    models.save_checkpoint(checkpoint, model, arch=run.arch, stem=run.stem, classes=run.data.classes,
                           extra={"step": step, "accuracy": accuracy, "preprocessing": run.preprocessing.to_dict()})
    macs, params = count_macs_params(model, run.preprocessing.input_size)
    entry = {"step": step, "macs": macs, "params": params, "accuracy": accuracy,
             "checkpoint": relative(run.run_dir, checkpoint), "onnx": None, "parity": None,
             "widths": conv_out_widths(model), **extra}
    run.put_step(entry)
    # only needed to resume this step mid-way; the step is now finished
    for leftover in ("train_state.pt", "pruned.pt"):
        (folder / leftover).unlink(missing_ok=True)


def finetune(run: Run) -> None:
    """Stage 1: step 0, the fine-tuned model (or the one given with ``--model``)."""
    if run.step_entry(0) is not None:
        console.print(f"[dim]step 0 already finished: accuracy {run.step_entry(0)['accuracy']:.4f}[/]")
        return
    config = run.config
    train_loader, val_loader = run.training_loaders()
    if config.model is not None:
        _import_step0(run, val_loader)
        return
    # a weights download happens once per node; the other processes find the file in the cache
    weights, weights_note = distributed.run_local_main_first(lambda: _resolved_weights(config))
    weights_record = {"weights": weights, **({"weights_note": weights_note} if weights_note else {})}
    run.manifest["stages"]["finetune"] = dict(weights_record)
    run.save()
    model = models.build_model(config.arch, len(run.data.classes), weights=weights, stem=config.stem,
                               trust_pickle=config.trust_pickle, checkpoint_key=config.checkpoint_key)
    settings = config.finetune_settings(pretrained=weights != "none")
    started = time.perf_counter()
    result = fit(model, train_loader, val_loader, settings, device=run.device,
                 state_path=step_dir(run.run_dir, 0) / "train_state.pt", label="fine-tune",
                 class_weight=run.class_weight(), seed=config.seed)
    run.manifest["stages"]["finetune"] = {
        **weights_record, "settings": settings.__dict__, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "history": result.history,
        "seconds": round(time.perf_counter() - started, 1), "device": str(run.device), "data_on_device": run.data_on_device,
        **_training_world(run),
    }
    _record_step(run, 0, model.cpu(), result.best_accuracy, {"source": "finetune"})
    console.print(f"step 0 (fine-tuned): val accuracy {result.best_accuracy:.4f}")


NEAR_CHANCE = 0.1
"""Step 0's accuracy within this fraction of the way from chance to 1 draws a warning."""


def _import_step0(run: Run, val_loader: Any) -> None:
    """Step 0 from ``--model``: the file's model as it is, its val accuracy measured and
    recorded in ``stages.import`` (file, format, key, architecture, accuracy, seconds)."""
    imported = run.imported or _import_model(run.config)  # other ranks under torchrun read it here
    started = time.perf_counter()
    accuracy = evaluate(imported.model.to(run.device), val_loader, run.device)
    chance = 1.0 / len(run.data.classes)
    record = {**imported.record(), "accuracy": accuracy, "val_images": len(run.data.val_labels),
              "evaluate_seconds": round(time.perf_counter() - started, 3), "chance": chance}
    keys = f", key '{imported.checkpoint.key}'" if imported.checkpoint.key else ""
    if imported.checkpoint.also:
        keys += f" (also in the file: {', '.join(imported.checkpoint.also)}; choose with --checkpoint-key)"
    prefix = f", prefix '{imported.checkpoint.prefix}' stripped" if imported.checkpoint.prefix else ""
    console.print(f"imported {escape(str(run.config.model))}: {imported.checkpoint.format}{escape(keys)}{escape(prefix)}; "
                  f"{imported.architecture.describe()}; read in {imported.seconds:.2f} s")
    if accuracy < chance + NEAR_CHANCE * (1.0 - chance):
        record["warning"] = (f"step 0 accuracy {accuracy:.4f} is near chance ({chance:.4f}): the class order "
                             "(--classes FILE) or the preprocessing (--mean, --std, --input-size) probably differ "
                             "from those the model was trained with")
        console.print(f"[yellow]warning: {escape(record['warning'])}[/]")
    run.manifest["stages"]["import"] = record
    run.manifest["stages"]["finetune"] = {"skipped": "started from --model", "model": str(run.config.model)}
    _record_step(run, 0, imported.model.cpu(), accuracy, {"source": "model"})
    console.print(f"step 0 (imported, not trained): val accuracy {accuracy:.4f}")


def prune_step(run: Run, step: int) -> None:
    """Stage 2, one step: prune step-1 towards this step's MACs target, retrain, record."""
    if run.step_entry(step) is not None:
        return
    config = run.config
    settings = config.prune_settings()
    folder = step_dir(run.run_dir, step)
    base = run.step_entry(0)
    _check_layer_caps(run, settings.layer_caps, base["widths"])
    target = step_targets(base["macs"], settings)[step - 1]
    pruned_path = folder / "pruned.pt"
    _write_pruned(run, step, target, pruned_path)  # under torchrun every rank then reads rank 0's file
    model, meta = models.load_checkpoint(pruned_path)
    prune_info = meta["extra"]["prune"]
    train_loader, val_loader = run.training_loaders()
    accuracy_before = evaluate(model.to(run.device), val_loader, run.device)
    teacher = run.load_step_model(0) if config.distill_weight > 0 else None
    started = time.perf_counter()
    result = fit(model, train_loader, val_loader, config.retrain_settings(), device=run.device,
                 state_path=folder / "train_state.pt", label=f"retrain step {step}",
                 class_weight=run.class_weight(), teacher=teacher, seed=config.seed + step)
    _record_step(run, step, model.cpu(), result.best_accuracy, {
        "source": "prune", "prune": prune_info, "accuracy_before_retrain": accuracy_before,
        "retrain": {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "history": result.history,
                    "seconds": round(time.perf_counter() - started, 1), "data_on_device": run.data_on_device,
                    **_training_world(run)},
    })
    entry = run.step_entry(step)
    console.print(f"step {step}: MACs {entry['macs'] / base['macs']:.1%} of step 0, accuracy "
                  f"{accuracy_before:.4f} after pruning -> {result.best_accuracy:.4f} after retraining")


@distributed.main_process_only
def _write_pruned(run: Run, step: int, target: int, path: Path) -> None:
    """Prune step-1 towards ``target`` MACs and save the result (before retraining) to ``path``,
    unless a killed run left it there."""
    if path.exists():
        return
    config = run.config
    previous = run.load_step_model(step - 1)
    model, prune_info = prune_to_macs(previous, target, config.prune_settings(), run.step_entry(0)["widths"],
                                      run.preprocessing.input_size)
    prune_info["target_macs"] = target
    models.save_checkpoint(path, model, arch=run.arch, stem=run.stem, classes=run.data.classes,
                           extra={"step": step, "prune": prune_info})


def _training_world(run: Run) -> dict[str, Any]:
    """The processes and batch sizes of a training stage; the top-level ``world_size`` and
    ``backend`` say those of the run's latest training stage."""
    world = distributed.describe(run.config.batch_size)
    run.manifest["world_size"], run.manifest["backend"] = world["world_size"], world["backend"]
    return world


def _check_layer_caps(run: Run, caps: dict[str, float], widths: dict[str, int]) -> None:
    """Caps must name layers of this model, and stay what they were when pruning started
    (the file is read again on resume)."""
    unknown = sorted(set(caps) - set(widths))
    if unknown:
        distributed.usage_error_everywhere(
            f"--layer-caps names layers this model does not have: {', '.join(unknown[:3])}")
    stored = run.manifest["stages"].get("layer_caps")
    if stored is None:
        run.manifest["stages"]["layer_caps"] = caps
        run.save()
    elif stored != caps:
        distributed.usage_error_everywhere(
            f"--layer-caps {run.config.layer_caps} changed since pruning started; restore it or use --force")


def prune(run: Run, *, export_each: bool = False) -> None:
    """Stage 2: the pruning steps. With ``--target-speedup`` each step is exported and its
    speed-up measured right away, and pruning stops at the first step that reaches it."""
    if run.step_entry(0) is None:
        distributed.usage_error_everywhere(
            f"{run.run_dir} has no fine-tuned model yet (step 0); run `compress finetune` first")
    steering = run.config.target_speedup is not None
    if steering:
        export_step(run, 0)
    for step in range(1, run.config.prune_steps + 1):
        if steering and _speedup_reached(run):
            break
        prune_step(run, step)
        if export_each or steering:
            export_step(run, step)
        if steering:
            _measure_speedup(run, step)
    if steering:
        reached = _speedup_reached(run)
        best = max((s["speedup_measured"]["speedup"] for s in run.manifest["steps"] if s.get("speedup_measured")), default=1.0)
        run.manifest["stages"]["target_speedup"] = {
            "target": run.config.target_speedup, "backend": run.config.latency_backend, "batch": run.config.latency_batch,
            "reached_at_step": reached, "best_speedup": best}
        run.save()
        if reached is None:
            console.print(f"[yellow]target speed-up {run.config.target_speedup}x not reached: best {best:.2f}x within "
                          f"--target-macs {run.config.target_macs} and --prune-steps {run.config.prune_steps}[/]")


def _speedup_reached(run: Run) -> int | None:
    for entry in run.manifest["steps"]:
        measured = entry.get("speedup_measured")
        if measured and measured["speedup"] >= run.config.target_speedup:
            return entry["step"]
    return None


@distributed.main_process_only
def _measure_speedup(run: Run, step: int) -> None:
    """Step ``step`` against step 0 on the steering backend, interleaved, recorded in its entry."""
    from .backends import BackendUnavailable
    from .latency import measure_step_speedup

    entry = run.step_entry(step)
    if entry.get("speedup_measured"):
        return
    try:
        measured = measure_step_speedup(run.run_dir, run.manifest, step, backend=run.config.latency_backend,
                                        batch=run.config.latency_batch, data=run.data,
                                        min_seconds=run.config.timing_seconds,
                                        max_seconds=10 * run.config.timing_seconds)
    except BackendUnavailable as exc:
        raise UsageError(f"--latency-backend {run.config.latency_backend}: {exc}") from None
    entry["speedup_measured"] = measured
    run.put_step(entry)
    console.print(f"step {step}: measured {measured['speedup']:.2f}x faster than step 0 on {measured['backend']} "
                  f"batch {measured['batch']} (target {run.config.target_speedup}x)")


@distributed.main_process_only
def export_step(run: Run, step: int) -> None:
    """Stage 3, one step: ONNX export, checker, parity on validation images, then the step's
    precision variants (``--precisions``)."""
    entry = run.step_entry(step)
    if entry is None:
        raise UsageError(f"step {step} is not finished; nothing to export")
    if not (entry.get("onnx") and entry.get("parity") and (run.run_dir / entry["onnx"]).exists()):
        model = run.load_step_model(step)
        path = step_dir(run.run_dir, step) / VARIANT_FILES["fp32"]
        metadata = {"classes": run.data.classes, "preprocessing": run.preprocessing.to_dict(), "arch": run.arch,
                    "step": step, "accuracy": entry["accuracy"], "macs": entry["macs"], "params": entry["params"],
                    "producer": "resnet-compress"}
        onnx_export.export_onnx(model, path, input_size=run.preprocessing.input_size, metadata=metadata,
                                opset=run.config.opset)
        _, val_loader = run.loaders()
        parity = onnx_export.parity_check(model, path, (images for images, _ in val_loader),
                                          tolerance=run.config.parity_tolerance)
        entry.update({"onnx": relative(run.run_dir, path), "onnx_bytes": path.stat().st_size, "parity": parity})
        entry.pop("variants", None)  # measured against the old fp32 file
        run.put_step(entry)
        console.print(f"step {step}: ONNX exported, parity max |diff| {parity['max_abs_diff']:.2e}, "
                      f"top-1 agreement {parity['top1_agreement']:.4f}")
    _export_program(run, step)
    build_variants(run, step, run.config.precision_list(), run.config.int8_settings())


def _export_program(run: Run, step: int) -> None:
    """The step as ``model.pt2`` (torch.export, dynamic batch), loaded back the way a user
    would and checked against the step's ONNX file on validation images."""
    entry = run.step_entry(step)
    if entry.get("pt2") and entry.get("pt2_parity") and (run.run_dir / entry["pt2"]).exists():
        return
    path = step_dir(run.run_dir, step) / onnx_export.PROGRAM_FILE
    onnx_export.export_program(run.load_step_model(step), path, input_size=run.preprocessing.input_size)
    _, val_loader = run.loaders()
    parity = onnx_export.parity_check(onnx_export.load_program(path), run.run_dir / entry["onnx"],
                                      (images for images, _ in val_loader), tolerance=run.config.parity_tolerance)
    entry.update({"pt2": relative(run.run_dir, path), "pt2_bytes": path.stat().st_size, "pt2_parity": parity})
    run.put_step(entry)
    console.print(f"step {step}: model.pt2 exported, against the ONNX file max |diff| {parity['max_abs_diff']:.2e}")


def _variant_current(run: Run, entry: dict[str, Any], precision: str, int8: Any) -> bool:
    """Whether the step's recorded variant exists and was made with the settings asked now."""
    variant = (entry.get("variants") or {}).get(precision)
    if not variant or not (run.run_dir / variant["onnx"]).is_file():
        return False
    if precision == "int8":
        recorded = variant.get("calibration") or {}
        same_format = int8.int8_format == variant.get("format_choice")
        # a record from before reduce_range existed quantized with the full range everywhere
        made_with = (recorded.get("asked_images"), recorded.get("method"), recorded.get("seed"),
                     recorded.get("reduce_range", "none"))
        return same_format and made_with == (int8.calibration_images, int8.calibration_method, int8.seed,
                                             int8.reduce_range)
    return True


def build_variants(run: Run, step: int, precisions: tuple[str, ...], int8: Any) -> None:
    """Make the step's missing precision variants (and those made with other int8 settings),
    then record every variant's accuracy and agreement with fp32 on the whole validation split.
    The fp32 record is ``{onnx, bytes, accuracy, top1_agreement: 1, max_abs_diff: 0, parity}``."""
    from . import variants as builders
    from .manifest import StepRecord

    entry = run.step_entry(step)
    folder = step_dir(run.run_dir, step)
    fp32_path = run.run_dir / entry["onnx"]
    # an entry from before variants existed: carry its fp16 file over, once
    current = {p: v.to_dict() for p, v in StepRecord.from_dict(entry).variants.items()}
    for key in ("onnx_fp16", "onnx_fp16_bytes", "fp16"):
        entry.pop(key, None)
    wanted = [p for p in precisions if p != "fp32" and not _variant_current(run, {"variants": current}, p, int8)]
    if not wanted and "fp32" in current and all(v.get("accuracy") is not None and v.get("cpu_threads")
                                                for v in current.values()):
        return
    kept = {p: run.run_dir / v["onnx"] for p, v in current.items() if p not in wanted and p != "fp32"}
    made = {"fp16": builders.build_fp16(fp32_path, folder)} if "fp16" in wanted else {}
    scratch = folder / builders.INT8_SCRATCH
    try:
        candidates: dict[str, Path] = {}
        if "int8" in wanted:
            calibration = builders.calibration_images(run.data, int8)
            candidates = builders.quantize_candidates(fp32_path, scratch, calibration, int8)
        files = {"fp32": fp32_path, **kept, **made, **{f"int8:{fmt}": path for fmt, path in candidates.items()}}
        _, val_loader = run.loaders()
        # one pass over the validation split for all, on the run's GPU where it trained on one
        measured = builders.evaluate_variants(files, val_loader, device=str(run.device))
        fp32_accuracy = measured["fp32"]["accuracy"]
        records = {}
        for precision in ("fp32", *kept, *made):
            details = {"parity": entry["parity"]} if precision == "fp32" else builders.details_of(current.get(precision, {}))
            records[precision] = builders.record(run.run_dir, files[precision], measured[precision], fp32_accuracy,
                                                 int8.max_accuracy_drop, details)
        if candidates:  # the calibration images serve as the timing probe: latency does not depend on content
            path, fmt, details = builders.keep_int8(fp32_path, folder, candidates,
                                                    {f: measured[f"int8:{f}"] for f in candidates}, fp32_accuracy,
                                                    int8, len(calibration), calibration,
                                                    max_seconds=3 * run.config.timing_seconds)
            records["int8"] = builders.record(run.run_dir, path, measured[f"int8:{fmt}"], fp32_accuracy,
                                              int8.max_accuracy_drop, details)
        # threads chosen per variant by measuring them all (the calibration images or a
        # validation batch as the probe: latency does not depend on the content)
        probe = calibration if candidates else next(iter(val_loader))[0].numpy().astype(np.float32)
        threads = builders.choose_threads({p: run.run_dir / r["onnx"] for p, r in records.items()}, probe,
                                          sorted({1, run.config.latency_batch}),
                                          max_seconds=3 * run.config.timing_seconds)
        for precision, record in records.items():
            record["cpu_threads"] = threads[precision]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    entry["variants"] = {p: records[p] for p in PRECISIONS if p in records}
    run.put_step(entry)
    for precision in wanted:
        v = entry["variants"][precision]
        extra = f", format {v['format']}" if precision == "int8" else ""
        console.print(f"step {step}: {precision} ONNX{extra}, top-1 {v['accuracy']:.4f} "
                      f"({-v['accuracy_drop'] * 100:+.2f} points vs fp32), agreement {v['top1_agreement']:.4f}"
                      + (" [yellow]flagged: over the allowed drop[/]" if v["flagged"] else ""))


@distributed.main_process_only
def quantize(run: Run, *, steps: list[int] | None, int8: Any, precisions: tuple[str, ...] = ("fp32", "int8")) -> None:
    """``compress quantize``: add precision variants to finished, exported steps of a run, then
    refresh the closing report if the run had one."""
    finished = [s["step"] for s in run.manifest["steps"]]
    chosen = finished if steps is None else steps
    unknown = sorted(set(chosen) - set(finished))
    if unknown:
        raise UsageError(f"--steps: the run has no step(s) {unknown} (steps: {finished})")
    for step in chosen:
        if not run.step_entry(step).get("onnx"):
            export_step(run, step)
        build_variants(run, step, precisions, int8)
    if run.manifest.get("report"):
        report(run, redo=True)


def export(run: Run) -> None:
    for entry in list(run.manifest["steps"]):
        export_step(run, entry["step"])


@distributed.main_process_only
def report(run: Run, *, redo: bool = False) -> dict[str, Any]:
    """Stage 4: ORT CPU latency of every step (interleaved, one run) and the closing report.
    Kept when it already covers every step, unless ``redo`` (``compress report`` measures again)."""
    from .report import write_run_report

    missing = [s["step"] for s in run.manifest["steps"] if not s.get("onnx")]
    if missing:
        raise UsageError(f"steps {missing} have no ONNX export yet; run `compress export` first")
    done = run.manifest.get("report")
    models = [f"{s['step']}:{p}" for s in run.manifest["steps"] for p in (s.get("variants") or {"fp32": None})]
    if not redo and done and done.get("models", [f"{s['step']}:fp32" for s in done["steps"]]) == models \
            and all((run.run_dir / done[key]).exists() for key in ("report", "pareto", "results")):
        console.print("[dim]report already written[/]")
        return done
    summary = write_run_report(run.run_dir, run.manifest, latency_batch=run.config.latency_batch, data=run.data,
                               timing_seconds=run.config.timing_seconds, int8=run.config.int8_settings())
    summary["models"] = models
    run.manifest["report"] = summary
    run.save()
    return summary


@distributed.main_process_only
def sensitivity(run: Run, *, step: int = 0, ratios: tuple[float, ...] | None = None,
                tolerance: float = 0.02) -> dict[str, Any]:
    """Per-group pruning sensitivity of a finished step (``compress sensitivity``)."""
    from rich.progress import Progress

    from . import sensitivity as sens

    model = run.load_step_model(step)
    _, val_loader = run.training_loaders()
    ratios = ratios or sens.DEFAULT_RATIOS
    groups = sens.prunable_groups(model, run.preprocessing.input_size, run.config.scope)
    with Progress(console=console) as progress:
        task = progress.add_task(f"sensitivity of step {step}", total=len(groups) * len(ratios))
        result = sens.analyse(model, val_loader, run.device, run.preprocessing.input_size, ratios=ratios,
                              scope=run.config.scope, progress=lambda: progress.advance(task), groups=groups)
    caps = sens.layer_caps(result, tolerance)
    folder = run.run_dir / "sensitivity"
    sens.write_outputs(folder, {**result, "step": step}, caps, tolerance)
    run.manifest["stages"]["sensitivity"] = {"step": step, "tolerance": tolerance, "folder": "sensitivity",
                                             "layer_caps": "sensitivity/layer_caps.yaml"}
    run.save()
    sensitive = [name for name, cap in caps.items() if cap == 0.0]
    console.print(f"{len(groups)} groups; sensitive (not to prune at tolerance {tolerance}): {', '.join(sensitive) or 'none'}")
    return caps


def run_all(run: Run) -> dict[str, Any]:
    """``compress run``: every stage, exporting each step as soon as it is trained."""
    finetune(run)
    export_step(run, 0)
    prune(run, export_each=True)
    return report(run)


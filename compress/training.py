"""Training: fine-tuning and post-pruning retraining with one loop.

Shaped after torchvision's ``references/classification/train.py``: one ``train_one_epoch``,
one ``evaluate``, a driver (:func:`fit`) that owns the schedule. What it adds for a product:
head-only epochs with a frozen backbone (transfer learning), Adam then SGD, early stopping
on validation accuracy with the best weights kept, AMP and channels_last on CUDA, optional
distillation from a teacher, and a state file written after every epoch so that a killed run
resumes at the last finished epoch.

Under torchrun (see :mod:`compress.distributed`) the same loop runs in every process with the
model in DistributedDataParallel and the loaders sharded; losses and accuracies are summed over
ranks, so every rank sees the same numbers and takes the same early-stopping decision. Rank 0
alone writes the state file; every rank reads it on resume."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from . import distributed
from .models import freeze_backbone
from .rundir import load_torch_safely, save_torch


@dataclass(frozen=True)
class TrainSettings:
    """One training phase's schedule (fine-tuning or a retraining step)."""

    epochs: int
    optimizer: str = "adam-then-sgd"  # adam | sgd | adam-then-sgd
    lr: float = 1e-3  # Adam's learning rate
    sgd_lr: float = 0.01
    momentum: float = 0.9
    switch_epoch: int | None = None  # adam-then-sgd: first SGD epoch (default: half-way)
    schedule: str = "cosine"  # cosine | step
    step_size: int = 10
    gamma: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    freeze_epochs: int = 0  # head-only epochs at the start (backbone frozen)
    patience: int = 0  # early stopping after this many epochs without a better val accuracy; 0 = off
    amp: bool = True  # used on CUDA only
    channels_last: bool = True  # used on CUDA only
    distill_weight: float = 0.0  # 0 = no distillation
    distill_temperature: float = 4.0


@dataclass
class TrainResult:
    best_accuracy: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def _phase(settings: TrainSettings, epoch: int) -> str:
    if settings.optimizer == "adam-then-sgd":
        switch = settings.switch_epoch if settings.switch_epoch is not None else max(1, settings.epochs // 2)
        return "adam" if epoch < switch else "sgd"
    return settings.optimizer


def _phase_bounds(settings: TrainSettings, epoch: int) -> tuple[int, int]:
    """First and one-past-last epoch of the optimizer phase that ``epoch`` belongs to."""
    phase = _phase(settings, epoch)
    start = epoch
    while start > 0 and _phase(settings, start - 1) == phase:
        start -= 1
    end = epoch + 1
    while end < settings.epochs and _phase(settings, end) == phase:
        end += 1
    return start, end


def _make_optimizer(model: nn.Module, settings: TrainSettings, phase: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters()]
    if phase == "adam":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.sgd_lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay, nesterov=True)


def _make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, length: int) -> Any:
    if settings.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.step_size, gamma=settings.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, length))


def _start_phase(model: nn.Module, settings: TrainSettings, epoch: int) -> tuple[str, torch.optim.Optimizer, Any]:
    """A fresh optimizer and an LR schedule spanning the optimizer phase that ``epoch`` is in."""
    phase = _phase(settings, epoch)
    optimizer = _make_optimizer(model, settings, phase)
    start, end = _phase_bounds(settings, epoch)
    return phase, optimizer, _make_scheduler(optimizer, settings, end - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``loader``."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(images)
        correct += (logits.argmax(1) == labels.to(logits.device)).sum().item()
        total += labels.numel()
    correct, total = distributed.all_reduce_sum([correct, total], device)  # each rank saw its own shard
    return correct / max(total, 1)


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    device: torch.device, scaler: torch.amp.GradScaler, settings: TrainSettings,
                    teacher: nn.Module | None, progress: Progress, task: Any) -> tuple[float, float, int]:
    """One pass over ``loader``: mean loss, accuracy and the number of images trained on (over
    all ranks)."""
    model.train()
    use_amp = settings.amp and device.type == "cuda"
    loss_sum = correct = seen = 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda" and settings.channels_last:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=use_amp):
            logits = model(images)
            loss = criterion(logits, labels)
            if teacher is not None and settings.distill_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                w = settings.distill_weight
                loss = (1 - w) * loss + w * _distill_loss(logits.float(), teacher_logits.float(), settings.distill_temperature)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if not math.isfinite(loss.item()):
            raise FloatingPointError("training loss is not finite; lower the learning rate")
        batch = labels.numel()
        loss_sum += loss.item() * batch
        correct += (logits.argmax(1) == labels).sum().item()
        seen += batch
        progress.update(task, advance=1, loss=loss_sum / seen, acc=correct / seen)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
    return loss_sum / max(seen, 1), correct / max(seen, 1), int(seen)


def make_progress() -> Progress:
    """Progress bars, shown by rank 0 alone under torchrun."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), transient=False,
                    disable=not distributed.is_main())


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, settings: TrainSettings, *,
        device: torch.device, state_path: Path, label: str, class_weight: torch.Tensor | None = None,
        teacher: nn.Module | None = None, seed: int = 0) -> TrainResult:
    """Train ``model`` in place and leave it holding its best (by val accuracy) weights.

    After every epoch the full state (weights, optimizer, scheduler, best weights, history,
    RNG) is written atomically to ``state_path``; if that file exists on entry, training
    continues after its last finished epoch."""
    model.to(device)
    if device.type == "cuda" and settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
    criterion = nn.CrossEntropyLoss(weight=class_weight.to(device) if class_weight is not None else None,
                                    label_smoothing=settings.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp and device.type == "cuda")
    torch.manual_seed(seed)
    start_epoch, best_accuracy, best_epoch, since_best = 0, -1.0, -1, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    saved = load_torch_safely(state_path) if state_path.exists() else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        start_epoch, best_accuracy, best_epoch = saved["epoch"] + 1, saved["best_accuracy"], saved["best_epoch"]
        since_best, history, best_state = saved["since_best"], saved["history"], saved["best_state"]
        torch.set_rng_state(saved["rng"])
    stopped_early = bool(saved and saved.get("stopped_early"))
    phase: str | None = None
    net, net_frozen = model, None  # what trains: ``model``, or ``model`` in DDP under torchrun
    with make_progress() as progress:
        for epoch in range(start_epoch, settings.epochs):
            if stopped_early:
                break
            if _phase(settings, epoch) != phase:
                phase, optimizer, scheduler = _start_phase(model, settings, epoch)
                if saved is not None and epoch == start_epoch and saved["phase"] == phase:
                    optimizer.load_state_dict(saved["optimizer"])  # resuming inside the same phase
                    scheduler.load_state_dict(saved["scheduler"])
            frozen = epoch < settings.freeze_epochs
            freeze_backbone(model, frozen)
            if frozen != net_frozen:  # DDP registers the parameters that train now
                net, net_frozen = distributed.wrap(model, device), frozen
            if distributed.active():
                distributed.set_epoch(train_loader, epoch)
                torch.manual_seed(distributed.epoch_seed(seed, epoch))
            task = progress.add_task(f"{label} {epoch + 1}/{settings.epochs} {phase}", total=len(train_loader),
                                     loss=0.0, acc=0.0, note="head only" if frozen else "")
            epoch_started = time.perf_counter()
            train_loss, train_acc, images = train_one_epoch(net, train_loader, optimizer, criterion, device, scaler,
                                                    settings, teacher, progress, task)
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - epoch_started
            images_per_second = images / max(epoch_seconds, 1e-9)
            scheduler.step()
            distributed.broadcast_buffers(model)  # every rank evaluates (and keeps) rank 0's BN statistics
            accuracy = evaluate(model, val_loader, device)
            history.append({"epoch": epoch, "phase": phase, "lr": optimizer.param_groups[0]["lr"],
                            "train_loss": train_loss, "train_accuracy": train_acc, "val_accuracy": accuracy,
                            "train_images_per_second": round(images_per_second, 1),
                            "train_seconds": round(epoch_seconds, 3), "train_images": images})
            if accuracy > best_accuracy:
                best_accuracy, best_epoch, since_best = accuracy, epoch, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                since_best += 1
            stopped_early = bool(settings.patience and since_best >= settings.patience and not frozen)
            progress.update(task, note=f"val {accuracy:.4f} (best {best_accuracy:.4f})" + (" early stop" if stopped_early else ""))
            if distributed.is_main():
                save_torch(state_path, {
                    "epoch": epoch, "phase": phase, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "best_accuracy": best_accuracy, "best_epoch": best_epoch,
                    "best_state": best_state, "since_best": since_best, "history": history,
                    "rng": torch.get_rng_state(), "stopped_early": stopped_early,
                })
    freeze_backbone(model, False)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # zero epochs: measure what we have
        best_accuracy, best_epoch = evaluate(model, val_loader, device), -1
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(best_accuracy, best_epoch, len(history), stopped_early, history)

"""Pruning sensitivity (Li et al., "Pruning Filters for Efficient ConvNets", sec. 4.1): prune
each prunable group alone at ratios 0.1 ... 0.9, without retraining, and measure validation
accuracy. Layers whose accuracy collapses early are sensitive: cap them (or skip them) and
prune the robust ones harder.

Outputs in ``RUN_DIR/sensitivity/``: ``sensitivity.csv`` (one row per group and ratio),
``sensitivity.json``, ``sensitivity.png``, and ``layer_caps.yaml``: for each group's root conv
the largest ratio whose accuracy drop stayed within the tolerance, to pass back as
``compress run --layer-caps FILE``."""
from __future__ import annotations

import copy
import csv
import io
from pathlib import Path
from typing import Any, Sequence

import torch
import torch_pruning as tp
import yaml
from torch import nn

from .models import example_input
from .pruning import ignored_layers
from .rundir import atomic_write_json, atomic_write_text, atomic_write_with
from .training import evaluate

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def prunable_groups(model: nn.Module, input_size: int, scope: str = "global") -> list[str]:
    """Names of the root convs of the groups torch-pruning would prune (one per group)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input(input_size))
    names = {module: name for name, module in model.named_modules()}
    roots = []
    for group in graph.get_all_groups(ignored_layers=ignored_layers(model, scope), root_module_types=[nn.Conv2d]):
        root = group[0].dep.target.module
        if isinstance(root, nn.Conv2d) and graph.is_out_channel_pruning_fn(group[0].dep.handler):
            roots.append(names[root])
    return roots


def prune_group_alone(model: nn.Module, root_name: str, ratio: float, input_size: int) -> nn.Module:
    """A copy of ``model`` with the lowest-L1 ``ratio`` of one group's channels removed."""
    pruned = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_input(input_size))
    root = dict(pruned.named_modules())[root_name]
    channels = root.out_channels
    group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(channels)))
    scores = tp.importance.MagnitudeImportance(p=1)(group)
    count = min(channels - 1, int(round(ratio * channels)))
    if count > 0:
        graph.get_pruning_group(root, tp.prune_conv_out_channels,
                                idxs=sorted(torch.argsort(scores)[:count].tolist())).prune()
    return pruned


def analyse(model: nn.Module, val_loader: Any, device: torch.device, input_size: int, *,
            ratios: Sequence[float] = DEFAULT_RATIOS, scope: str = "global", progress: Any = None,
            groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy of the model with each group (default: all prunable ones) pruned alone at each ratio."""
    model = model.eval()
    baseline = evaluate(model.to(device), val_loader, device)
    model.cpu()
    rows = []
    groups = list(groups) if groups is not None else prunable_groups(model, input_size, scope)
    for name in groups:
        for ratio in ratios:
            pruned = prune_group_alone(model, name, ratio, input_size)
            accuracy = evaluate(pruned.to(device), val_loader, device)
            rows.append({"layer": name, "ratio": ratio, "accuracy": accuracy, "drop": baseline - accuracy})
            if progress is not None:
                progress()
    return {"baseline_accuracy": baseline, "ratios": list(ratios), "groups": groups, "rows": rows}


def layer_caps(result: dict[str, Any], tolerance: float) -> dict[str, float]:
    """Per group: the largest ratio whose drop (and every smaller ratio's) is within
    ``tolerance``; 0.0 means "sensitive: do not prune"."""
    caps: dict[str, float] = {}
    for name in result["groups"]:
        cap = 0.0
        for row in sorted((r for r in result["rows"] if r["layer"] == name), key=lambda r: r["ratio"]):
            if row["drop"] > tolerance:
                break
            cap = row["ratio"]
        caps[name] = cap
    return caps


def write_outputs(folder: Path, result: dict[str, Any], caps: dict[str, float], tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["layer", "ratio", "accuracy", "drop"])
    writer.writeheader()
    writer.writerows(result["rows"])
    atomic_write_text(folder / "sensitivity.csv", buffer.getvalue())
    atomic_write_json(folder / "sensitivity.json", {**result, "tolerance": tolerance, "layer_caps": caps})
    atomic_write_text(folder / "layer_caps.yaml",
                      f"# largest ratio per group whose accuracy drop stayed within {tolerance:.3f} "
                      f"(0 = sensitive, not pruned)\n" + yaml.safe_dump(caps, sort_keys=False))

    def draw(tmp: Path) -> None:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for name in result["groups"]:
            rows = sorted((r for r in result["rows"] if r["layer"] == name), key=lambda r: r["ratio"])
            ax.plot([r["ratio"] for r in rows], [r["accuracy"] * 100 for r in rows], marker=".", label=name)
        ax.axhline(result["baseline_accuracy"] * 100, color="black", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel("fraction of the group's filters pruned (alone, no retraining)")
        ax.set_ylabel("top-1 accuracy, %")
        ax.set_title("Pruning sensitivity per group (root conv)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower left")
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)

    atomic_write_with(folder / "sensitivity.png", draw)


def load_layer_caps(path: Path) -> dict[str, float]:
    from .errors import UsageError

    if not path.is_file():
        raise UsageError(f"--layer-caps {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        caps = {str(k): float(v) for k, v in data.items()}
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        raise UsageError(f"--layer-caps {path}: expected a mapping of layer name to ratio in [0, 1)") from None
    bad = [k for k, v in caps.items() if not 0.0 <= v < 1.0]
    if bad:
        raise UsageError(f"--layer-caps {path}: ratio of '{bad[0]}' must be in [0, 1)")
    return caps

"""Structured pruning of whole conv filters by L1 magnitude, with torch-pruning.

Everything that touches channels goes through torch-pruning's dependency graph: it knows
that a residual add ties the channels of several convs and BNs together and prunes the
whole group. What this module adds:

- a MACs target per step: step k of K keeps ``target ** (k / K)`` of step 0's MACs (a
  geometric schedule, so each step removes the same fraction), found by bisection on the
  pruning ratio, so the last step really reaches ``--target-macs``;
- a per-layer cap (``max_layer_ratio``, relative to step 0's widths) so no layer collapses to a
  handful of channels, enforced on every group before it is pruned;
- widths kept at multiples of ``round_to`` (tensor cores like multiples of 8);
- the classifier is never pruned."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .errors import UsageError
from .models import classifier, example_input

SCOPES = ("global", "uniform", "block")


@dataclass(frozen=True)
class PruneSettings:
    target_macs: float = 0.4  # fraction of step 0's MACs the last step keeps
    steps: int = 3
    scope: str = "global"  # global: rank all filters together; uniform: the same ratio in every layer;
    # block: only the inner convs of each residual block (Li et al.), ranked together
    max_layer_ratio: float = 0.75  # no layer loses more than this fraction of its step-0 filters
    round_to: int = 8
    layer_caps: dict[str, float] = field(default_factory=dict)  # per group root conv, from `compress sensitivity`


def count_macs_params(model: nn.Module, input_size: int) -> tuple[int, int]:
    """MACs and parameters for one image, counted by torch-pruning."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    macs, params = tp.utils.count_ops_and_params(model, example_input(input_size, device=device))
    model.train(was_training)
    return int(macs), int(params)


def step_targets(base_macs: int, settings: PruneSettings) -> list[int]:
    """MACs each step 1..K must reach (at most)."""
    return [int(base_macs * settings.target_macs ** (k / settings.steps)) for k in range(1, settings.steps + 1)]


def _floor_width(name: str, initial: int, settings: PruneSettings) -> int:
    """The fewest output channels a layer may keep: (1 - cap) of its step-0 width, rounded up
    to ``round_to`` (but never above its initial width). The cap is the layer's own from
    ``layer_caps`` (0 = do not prune) or ``max_layer_ratio``."""
    cap = min(settings.layer_caps.get(name, settings.max_layer_ratio), settings.max_layer_ratio)
    keep = initial * (1.0 - cap)
    rounded = math.ceil(keep / settings.round_to) * settings.round_to if settings.round_to > 1 else math.ceil(keep)
    return max(1, min(initial, rounded))


def block_inner_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Convs whose output stays inside a residual block (a BasicBlock's conv1, a Bottleneck's
    conv1 and conv2): pruning them changes no shape on the residual path."""
    inner: list[nn.Conv2d] = []
    for module in model.modules():
        if isinstance(getattr(module, "conv2", None), nn.Conv2d) and isinstance(getattr(module, "conv1", None), nn.Conv2d) \
                and hasattr(module, "bn2"):
            inner.append(module.conv1)
            if isinstance(getattr(module, "conv3", None), nn.Conv2d):
                inner.append(module.conv2)
    return inner


def ignored_layers(model: nn.Module, scope: str) -> list[nn.Module]:
    """What the pruner must leave alone: always the classifier; in ``block`` scope also every
    conv on the residual path."""
    ignored: list[nn.Module] = [classifier(model)]
    if scope == "block":
        inner = set(block_inner_convs(model))
        ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in inner]
    return ignored


def _prune_once(model: nn.Module, ratio: float, settings: PruneSettings, initial_widths: dict[str, int],
                input_size: int) -> nn.Module:
    """Prune ``model`` in place by ``ratio`` of its current channels (globally ranked or per
    layer), clipping each group so no layer drops below its floor."""
    model.eval()
    importance = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(
        model, example_input(input_size, device=next(model.parameters()).device), importance=importance,
        global_pruning=settings.scope in ("global", "block"), pruning_ratio=ratio, iterative_steps=1,
        ignored_layers=ignored_layers(model, settings.scope),  # widths are rounded below, after the per-layer cap
    )
    graph = pruner.DG
    names = {module: name for name, module in model.named_modules()}
    for group in pruner.step(interactive=True):
        root = group[0].dep.target.module
        handler = group[0].dep.handler
        if not graph.is_out_channel_pruning_fn(handler) or not isinstance(root, nn.Conv2d):
            group.prune()
            continue
        current = root.out_channels
        floor = _floor_width(names[root], initial_widths.get(names[root], current), settings)
        n_pruned = min(len(group[0].idxs), max(0, current - floor))
        if settings.round_to > 1 and n_pruned:
            # round the kept width *up* to a multiple of round_to: never below the floor
            kept = min(current, math.ceil((current - n_pruned) / settings.round_to) * settings.round_to)
            n_pruned = current - kept
        if n_pruned <= 0:
            continue
        # the n least important channels of the whole group, by the same L1 importance
        full = graph.get_pruning_group(root, handler, idxs=list(range(current)))
        order = torch.argsort(importance(full)).tolist()
        graph.get_pruning_group(root, handler, idxs=sorted(order[:n_pruned])).prune()
    return model


def conv_out_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def prune_to_macs(model: nn.Module, target_macs: int, settings: PruneSettings, initial_widths: dict[str, int],
                  input_size: int, *, tolerance: float = 0.01, iterations: int = 14) -> tuple[nn.Module, dict[str, Any]]:
    """Return a pruned copy of ``model`` with at most ``target_macs`` MACs, pruning as little
    as possible: bisection on the pruning ratio, each trial on a fresh copy."""
    current_macs, _ = count_macs_params(model, input_size)
    if current_macs <= target_macs:
        return copy.deepcopy(model), {"ratio": 0.0, "macs": current_macs, "trials": 0}
    low, high = 0.0, 1.0
    best: tuple[nn.Module, float, int] | None = None
    for trial in range(iterations):
        ratio = (low + high) / 2
        candidate = _prune_once(copy.deepcopy(model), ratio, settings, initial_widths, input_size)
        macs, _ = count_macs_params(candidate, input_size)
        if macs <= target_macs:
            best = (candidate, ratio, macs)
            high = ratio
            if macs >= target_macs * (1 - tolerance):
                break
        else:
            low = ratio
    if best is None:
        candidate = _prune_once(copy.deepcopy(model), 0.999, settings, initial_widths, input_size)
        macs, _ = count_macs_params(candidate, input_size)
        if macs > target_macs:
            raise UsageError(
                f"cannot prune to {target_macs:,} MACs: with --max-layer-ratio {settings.max_layer_ratio} the smallest "
                f"model has {macs:,} MACs; raise --max-layer-ratio or --target-macs")
        best = (candidate, 0.999, macs)
    pruned, ratio, macs = best
    return pruned, {"ratio": round(ratio, 6), "macs": macs, "trials": trial + 1}


def validate_settings(settings: PruneSettings) -> None:
    if not 0.0 < settings.target_macs <= 1.0:
        raise UsageError(f"--target-macs must be in (0, 1], got {settings.target_macs}")
    if settings.steps < 0:
        raise UsageError(f"--prune-steps must be >= 0, got {settings.steps}")
    if settings.scope not in SCOPES:
        raise UsageError(f"unknown --scope {settings.scope}; choose one of {', '.join(SCOPES)}")
    if not 0.0 < settings.max_layer_ratio < 1.0:
        raise UsageError(f"--max-layer-ratio must be in (0, 1), got {settings.max_layer_ratio}")
    if settings.round_to < 1:
        raise UsageError(f"--round-to must be >= 1, got {settings.round_to}")

"""The architecture of a ResNet read from its weights alone: block type (BasicBlock or
Bottleneck), blocks per stage, the stem (7x7 + max-pool, or the 3x3 CIFAR stem), the CIFAR
family resnet20..110, the class count, and every layer's width (a ResNet pruned elsewhere is
narrower than the standard widths). A file that is not such a ResNet is refused with one line
naming what did not fit (a deep stem, squeeze-and-excitation, grouped convolutions, extra head
layers, a VGG...), so a model is never silently changed to fit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import models
from .errors import UsageError

STAGES = ("layer1", "layer2", "layer3", "layer4")
TOP_LEVEL = {"conv1", "bn1", *STAGES, "fc"}
TORCHVISION_LAYOUTS = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}


@dataclass(frozen=True)
class Architecture:
    """What the weights say the model is."""

    arch: str  # one of models.ARCHS
    stem: str  # imagenet (7x7/2 + max-pool) or cifar (3x3/1, no max-pool)
    block: str  # BasicBlock or Bottleneck
    blocks: tuple[int, ...]  # per stage
    num_classes: int
    narrower: int  # layers narrower than the architecture's standard width (pruned elsewhere)

    def describe(self) -> str:
        stem = "7x7 stem + max-pool" if self.stem == "imagenet" else "3x3 CIFAR stem"
        if self.arch in models.CIFAR_DEPTHS:
            stem = "CIFAR ResNet"
        widths = f", {self.narrower} layers narrower than standard" if self.narrower else ""
        return (f"{self.arch} ({self.block} {'-'.join(map(str, self.blocks))}, {stem}, "
                f"{self.num_classes} classes{widths})")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "stem": self.stem, "block": self.block, "blocks": list(self.blocks),
                "num_classes": self.num_classes, "narrower_layers": self.narrower, "description": self.describe()}


def _refuse(where: str, what: str) -> UsageError:
    return UsageError(f"{where}: not a ResNet this tool can rebuild: {what}")


def infer_architecture(state: dict[str, torch.Tensor], where: str) -> tuple[str, str, str, tuple[int, ...], int]:
    """(arch, stem, block, blocks per stage, classes) from the state dict's keys and shapes."""
    keys = set(state)
    if any(k.startswith(("features.", "classifier.")) for k in keys):
        example = sorted(k for k in keys if k.startswith(("features.", "classifier.")))[0]
        raise _refuse(where, f"'features'/'classifier' layers of a VGG-style network (e.g. '{example}')")
    if "conv1.weight" not in keys:
        if "conv1.0.weight" in keys:
            raise _refuse(where, "a deep stem of three 3x3 convs ('conv1.0.weight', like timm's resnet50d); "
                                 "only the 7x7 or the 3x3 CIFAR stem is supported")
        raise _refuse(where, f"no 'conv1.weight' stem (keys start with '{sorted(keys)[0] if keys else 'nothing'}')")
    squeeze = sorted(k for k in keys if any(part in ("se", "se_module", "attn") for part in k.split(".")))
    if squeeze:
        raise _refuse(where, f"squeeze-and-excitation or attention blocks (e.g. '{squeeze[0]}')")
    head = sorted(k for k in keys if k.startswith("fc.") and k not in ("fc.weight", "fc.bias"))
    if head:
        raise _refuse(where, f"extra head layers (e.g. '{head[0]}'); the head must be one Linear layer 'fc'")
    foreign = sorted(k for k in keys if k.split(".", 1)[0] not in TOP_LEVEL)
    if foreign:
        raise _refuse(where, f"layers a ResNet does not have (e.g. '{foreign[0]}')")
    if "fc.weight" not in keys or state["fc.weight"].dim() != 2:
        raise _refuse(where, "no linear head 'fc.weight'")
    kernel = tuple(state["conv1.weight"].shape[-2:])
    stem = {(7, 7): "imagenet", (3, 3): "cifar"}.get(kernel)
    if stem is None:
        raise _refuse(where, f"a {kernel[0]}x{kernel[1]} stem conv (expected 7x7 or 3x3)")
    stages = [s for s in STAGES if any(k.startswith(f"{s}.") for k in keys)]
    if stages != list(STAGES[: len(stages)]) or len(stages) < 3:
        raise _refuse(where, f"stages {', '.join(stages) or 'none'} (expected layer1..layer4, or layer1..layer3 "
                             "for CIFAR ResNets)")
    blocks = tuple(1 + max(int(k.split(".")[1]) for k in keys if k.startswith(f"{s}.") and k.split(".")[1].isdigit())
                   for s in stages)
    block = "Bottleneck" if "layer1.0.conv3.weight" in keys else "BasicBlock"
    for stage, count in zip(stages, blocks):
        for index in range(count):
            conv2, bn1 = state.get(f"{stage}.{index}.conv2.weight"), state.get(f"{stage}.{index}.bn1.weight")
            if conv2 is not None and bn1 is not None and conv2.shape[1] != bn1.shape[0]:
                raise _refuse(where, f"grouped convolutions in '{stage}.{index}.conv2' (ResNeXt-style: "
                                     f"{conv2.shape[1]} input channels per group of {bn1.shape[0]})")
    layout = "-".join(map(str, blocks))
    if len(stages) == 4:
        arch = TORCHVISION_LAYOUTS.get((block, blocks))
        if arch is None:
            raise _refuse(where, f"{block} blocks {layout} per stage match none of resnet18/34/50/101/152")
    else:
        depth = 6 * blocks[0] + 2
        arch = f"resnet{depth}"
        if block != "BasicBlock" or len(set(blocks)) != 1 or arch not in models.CIFAR_DEPTHS or stem != "cifar":
            raise _refuse(where, f"three stages of {block} blocks {layout} with a {kernel[0]}x{kernel[1]} stem match "
                                 f"none of the CIFAR ResNets {', '.join(models.CIFAR_DEPTHS)}")
    return arch, stem, block, blocks, int(state["fc.weight"].shape[0])


def _widths_from_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Each conv/bn/linear layer's width as the weights have it (missing layers keep the model's)."""
    widths = models.layer_widths(model)
    for name, width in widths.items():
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if weight.dim() == 4 or weight.dim() == 2:
            widths[name] = [int(weight.shape[1]), int(weight.shape[0])]
        elif weight.dim() == 1:
            widths[name] = [int(weight.shape[0])]
    return widths


def build_from_state(state: dict[str, torch.Tensor], where: str) -> tuple[nn.Module, Architecture]:
    """Rebuild the ResNet the state dict holds, every layer at the width the weights have, and
    load the weights exactly (no missing or extra tensor but ``num_batches_tracked``)."""
    arch, stem, block, blocks, num_classes = infer_architecture(state, where)
    model = models.build_model(arch, num_classes, weights="none", stem=stem if arch in models.TORCHVISION_ARCHS else "imagenet")
    standard = models.layer_widths(model)
    widths = _widths_from_state(model, state)
    models.resize_layers(model, widths)
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise _refuse(where, f"'{name}' has shape {tuple(tensor.shape)} where a {arch} has {tuple(own[name].shape)}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise _refuse(where, f"no '{missing[0]}' (a {arch} has it)")
    if result.unexpected_keys:
        raise _refuse(where, f"'{result.unexpected_keys[0]}' is not a layer of a {arch}")
    narrower = sum(1 for name, width in widths.items() if width != standard[name])
    return model, Architecture(arch, stem, block, blocks, num_classes, narrower)


@dataclass
class ImportedModel:
    """A model file read as step 0: the rebuilt model and how it was found."""

    model: nn.Module
    checkpoint: Any  # checkpoints.Checkpoint
    architecture: Architecture
    classes: list[str] | None  # the class names this tool's own checkpoints record
    seconds: float = 0.0  # reading the file and rebuilding the model

    @property
    def arch(self) -> str:
        return self.architecture.arch

    @property
    def stem(self) -> str:
        return self.architecture.stem

    @property
    def num_classes(self) -> int:
        return self.architecture.num_classes

    def record(self) -> dict[str, Any]:
        """``stages.import`` of the manifest (without the measured accuracy and time)."""
        return {"file": str(self.checkpoint.path), "format": self.checkpoint.format, "key": self.checkpoint.key,
                "prefix_stripped": self.checkpoint.prefix, "other_keys": self.checkpoint.also,
                "architecture": self.architecture.to_dict(), "read_seconds": round(self.seconds, 3)}


def load_model_file(path: Any, *, trust_pickle: bool = False, key: str | None = None,
                    option: str = "--model") -> ImportedModel:
    """Any model file a user brings (see :mod:`compress.checkpoints`), rebuilt as the ResNet
    its weights describe (a trusted pickled module too: pruning needs the plain ResNet)."""
    import time

    from .checkpoints import read_checkpoint

    started = time.perf_counter()
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle, key=key, option=option)
    model, architecture = build_from_state(checkpoint.state_dict, f"{option} {checkpoint.path}")
    classes = list(checkpoint.meta["classes"]) if checkpoint.format == "compress" else None
    return ImportedModel(model.eval(), checkpoint, architecture, classes, time.perf_counter() - started)

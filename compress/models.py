"""Models: torchvision ResNets, CIFAR-style ResNets, pretrained weights, and checkpoints that
reload a pruned model safely.

A checkpoint is a plain dict (tensors, strings, ints) so it loads with
``torch.load(weights_only=True)``: the architecture name, the width of every conv/bn/linear
layer (pruning changes them), and the state dict. Rebuilding the base architecture and
resizing its layers to the recorded widths gives back the pruned model without running
pruning again and without unpickling code."""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models

from .checkpoints import CHECKPOINT_KIND, read_checkpoint
from .errors import UsageError
from .rundir import load_torch_safely, save_torch

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
ARCHS = TORCHVISION_ARCHS + tuple(CIFAR_DEPTHS)


class CifarBasicBlock(nn.Module):
    """He et al.'s CIFAR block with a 1x1 projection shortcut ("option B"), which ONNX and
    torch-pruning's dependency graph both handle without special cases."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-20/32/56/110 for 32x32 inputs: 3x3 stem, three stages of 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for index in range(blocks):
                layers.append(CifarBasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision_weights_enum(arch: str) -> Any:
    return tv_models.get_model_weights(arch).DEFAULT


CONNECT_TIMEOUT_S = 5.0
"""How long the reachability probe waits for the weights server (name lookup included), and
the socket timeout while downloading: offline, ``--weights imagenet`` fails in seconds."""


def imagenet_weights_url(arch: str) -> str:
    """torchvision's URL for ``arch``'s ImageNet weights (its file name carries the first hex
    digits of the file's SHA-256, which the download checks). Tests point it at a local server."""
    return _torchvision_weights_enum(arch).url


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's weights API keeps (and looks for) the file: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(imagenet_weights_url(arch)).path)


def imagenet_weights_available(arch: str) -> bool:
    """True when the ImageNet weights file is already in the torch cache (no network needed)."""
    return arch in TORCHVISION_ARCHS and imagenet_weights_path(arch).is_file()


class WeightsUnavailable(UsageError):
    """The ImageNet weights are neither cached nor downloadable (offline, server down, bad file)."""


def _probe(url: str, timeout: float) -> None:
    """Fail fast when the weights server cannot be reached: name lookup and TCP connect in a
    daemon thread, waited for at most ``timeout`` seconds (a lookup cannot be interrupted)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise OSError(f"no answer from {parsed.hostname}:{port} within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def imagenet_state_dict(arch: str, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """``arch``'s ImageNet state dict from the torch cache, downloaded into it first when missing
    through torch.hub (progress bar, SHA-256 prefix in the file name checked, atomic rename).
    Raises :class:`WeightsUnavailable` with one line saying where the file goes."""
    path = imagenet_weights_path(arch)
    if path.is_file():
        return load_torch_safely(path)
    url = imagenet_weights_url(arch)
    where = f"download {url} to {path} (or set TORCH_HOME), or use --weights none"
    try:
        _probe(url, CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(f"--weights imagenet: {path.name} is not in the torch cache and "
                                 f"{urllib.parse.urlparse(url).hostname} cannot be reached ({_first_line(exc)}); "
                                 f"{where}") from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CONNECT_TIMEOUT_S * 6)  # a stalled transfer ends instead of hanging
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(path.parent), progress=progress, check_hash=True,
                                                  file_name=path.name, map_location="cpu", weights_only=True)
    except Exception as exc:  # URLError, HTTPError, timeout, hash mismatch (RuntimeError), not a state dict
        raise WeightsUnavailable(f"--weights imagenet: downloading {url} failed ({_first_line(exc)}); "
                                 f"{where}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_model(arch: str, num_classes: int, *, weights: str = "none", stem: str = "imagenet",
                trust_pickle: bool = False, checkpoint_key: str | None = None) -> nn.Module:
    """Build ``arch`` with a ``num_classes`` head.

    ``weights``: ``imagenet`` (torchvision's weights, from the torch cache or downloaded into it;
    offline, a clear error says where the file goes), ``none`` (from scratch) or a weights file
    (``checkpoint_key``: which entry of a checkpoint dict, as ``--checkpoint-key``).
    ``stem='cifar'`` swaps a torchvision ResNet's 7x7/2 conv + max-pool for a 3x3/1 conv, for
    32x32 inputs."""
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch}; choose one of {', '.join(ARCHS)}")
    if arch in CIFAR_DEPTHS:
        if weights == "imagenet":
            raise UsageError(f"--weights imagenet: there are no ImageNet weights for the CIFAR-style {arch}")
        model: nn.Module = CifarResNet(CIFAR_DEPTHS[arch], num_classes)
    else:
        model = tv_models.get_model(arch, weights=None)
        if weights == "imagenet":
            model.load_state_dict(imagenet_state_dict(arch))
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif stem != "imagenet":
            raise UsageError(f"unknown --stem {stem}; choose imagenet or cifar")
    if weights not in ("imagenet", "none"):
        load_weights_file(model, Path(weights), trust_pickle=trust_pickle, key=checkpoint_key)
    return model


def load_weights_file(model: nn.Module, path: Path, *, trust_pickle: bool, key: str | None = None) -> bool:
    """Load a user's weights file (any format :func:`checkpoints.read_checkpoint` reads) into
    ``model`` of the architecture given with ``--arch``. A head of a different size is left
    out (transfer learning onto new classes); returns whether it was."""
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle, key=key, option="--weights")
    state = dict(checkpoint.state_dict)
    own = model.state_dict()
    head = {k for k in state if k.startswith("fc.") and k in own and state[k].shape != own[k].shape}
    for name in head:
        del state[name]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        raise UsageError(f"--weights {path}: shapes do not match the architecture (e.g. {mismatched[0]}); wrong --arch?")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise UsageError(f"--weights {path}: does not fit the architecture (e.g. '{example}'); wrong --arch?")
    return bool(head)


# --- checkpoints of (possibly pruned) models ---------------------------------------------------

def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Channel counts of every layer that pruning can change."""
    widths: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            widths[name] = [module.in_channels, module.out_channels]
        elif isinstance(module, nn.BatchNorm2d):
            widths[name] = [module.num_features]
        elif isinstance(module, nn.Linear):
            widths[name] = [module.in_features, module.out_features]
    return widths


def resize_layers(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Replace each conv/bn/linear whose recorded width differs by a fresh module of that width;
    the weights come from the state dict afterwards."""
    modules = dict(model.named_modules())
    for name, width in widths.items():
        module = modules.get(name)
        if module is None:
            raise UsageError(f"checkpoint names a layer '{name}' that the architecture does not have")
        if isinstance(module, nn.Conv2d) and [module.in_channels, module.out_channels] != width:
            new: nn.Module = nn.Conv2d(width[0], width[1], module.kernel_size, module.stride, module.padding,
                                       module.dilation, groups=module.groups, bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d) and [module.num_features] != width:
            new = nn.BatchNorm2d(width[0], eps=module.eps, momentum=module.momentum)
        elif isinstance(module, nn.Linear) and [module.in_features, module.out_features] != width:
            new = nn.Linear(width[0], width[1], bias=module.bias is not None)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)


def save_checkpoint(path: Path, model: nn.Module, *, arch: str, stem: str, classes: list[str],
                    extra: dict[str, Any] | None = None) -> None:
    save_torch(path, {
        "kind": CHECKPOINT_KIND,
        "arch": arch,
        "stem": stem,
        "classes": list(classes),
        "widths": layer_widths(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    })


def load_checkpoint(path: Path, *, trust_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` (pruned or not) and return it with the
    checkpoint's metadata. A plain pickled ``nn.Module`` is accepted only with ``trust_pickle``.
    (Other people's files go through :func:`architecture.load_model_file`.)"""
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle, option="checkpoint")
    if checkpoint.module is not None:
        return checkpoint.module, {"arch": type(checkpoint.module).__name__, "stem": "imagenet", "classes": None}
    if checkpoint.format != "compress":
        raise UsageError(f"{path} is not a compress checkpoint")
    return rebuild(checkpoint.meta, checkpoint.state_dict), dict(checkpoint.meta)


def rebuild(meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model of one of this tool's checkpoints: the base architecture, every layer resized
    to its recorded width, the weights loaded."""
    model = build_model(meta["arch"], len(meta["classes"]), weights="none", stem=meta.get("stem", "imagenet"))
    resize_layers(model, meta["widths"])
    model.load_state_dict(state_dict)
    return model


def example_input(input_size: int, batch: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, input_size, input_size, device=device)


def classifier(model: nn.Module) -> nn.Module:
    """The final linear layer, which pruning must never touch."""
    return model.fc


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Transfer learning: train only the head while ``frozen``."""
    head = set(id(p) for p in classifier(model).parameters())
    for parameter in model.parameters():
        parameter.requires_grad = (not frozen) or id(parameter) in head


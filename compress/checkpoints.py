"""The one reader of model files (``--weights FILE`` and ``--model FILE``), in the spirit of
timm's ``timm/models/_helpers.py``: whatever way a user saved a ResNet, it comes back as a
plain state dict (or this tool's checkpoint), and nothing in the file runs.

One function per format, tried in :func:`read_checkpoint`:

- ``.safetensors`` (the safetensors library: raw tensors and a JSON header);
- TorchScript archives (``torch.jit.save``): the weights are read from the archive's
  ``data.pkl`` with a restricted unpickler that builds tensors and inert placeholders only,
  never the archive's code (``torch.jit.load`` would compile and run it);
- ``torch.save`` files, read with ``torch.load(weights_only=True)`` that allows, besides
  tensors and containers, only the harmless globals such files hold (``argparse.Namespace``
  of torchvision's reference scripts, Lightning's ``AttributeDict`` read as a plain dict);
- a pickled ``nn.Module`` only with ``--trust-pickle`` (the one format that runs code).

Then the usual wrappers are unwrapped (``model``, ``state_dict``, ``model_ema``,
``state_dict_ema``, or ``--checkpoint-key``) and a prefix shared by every key (``module.``
of DDP, ``_orig_mod.`` of torch.compile, ``model.``/``net.`` of Lightning) is stripped."""
from __future__ import annotations

import argparse
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError

CHECKPOINT_KIND = "resnet-compress/checkpoint"
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
"""Where the usual checkpoint dicts keep the weights, in the order tried (timm's loader reads
``state_dict`` then ``model``; the EMA copies are taken when nothing else is there, or with
``--checkpoint-key``)."""


@dataclass
class Checkpoint:
    """What a model file held: its weights as a state dict (or a trusted pickled module), how
    they were found (recorded in the manifest's ``stages.import``), and for this tool's own
    checkpoints their metadata (arch, stem, classes, widths)."""

    path: Path
    format: str  # safetensors | torchscript | torch | compress | pickled-module
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    key: str | None = None  # the wrapper key the weights were under
    prefix: str | None = None  # the prefix stripped from every key
    module: nn.Module | None = None  # a pickled nn.Module (--trust-pickle only)
    meta: dict[str, Any] = field(default_factory=dict)  # this tool's checkpoints: arch, stem, classes, widths, extra
    also: list[str] = field(default_factory=list)  # other wrapper keys that hold weights too

    def describe(self) -> str:
        parts = [self.format] + ([f"key '{self.key}'"] if self.key else []) + \
                ([f"prefix '{self.prefix}' stripped"] if self.prefix else [])
        return ", ".join(parts)


def read_checkpoint(path: Path, *, trust_pickle: bool = False, key: str | None = None,
                    option: str = "--model") -> Checkpoint:
    """Read any supported model file; raises :class:`UsageError` with one line (naming
    ``option`` and the file) when it cannot be used."""
    path = Path(path)
    where = f"{option} {path}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file")
    if path.stat().st_size == 0:
        raise UsageError(f"{where}: the file is empty")
    if _is_safetensors(path):
        checkpoint = read_safetensors(path, where)
    elif _is_torchscript(path):
        checkpoint = read_torchscript(path, where)
    else:
        checkpoint = read_torch_file(path, where, trust_pickle=trust_pickle)
    if checkpoint.format in ("compress", "pickled-module"):
        return checkpoint
    state, checkpoint.key = unwrap(checkpoint.state_dict, key, where)
    checkpoint.also = other_weight_keys(checkpoint.state_dict, checkpoint.key)
    state, checkpoint.prefix = strip_shared_prefix(state)
    checkpoint.state_dict = state
    return checkpoint


# --- formats ------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= path.stat().st_size - 8


def read_safetensors(path: Path, where: str) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{where}: not a readable safetensors file ({_first_line(exc)})") from None
    return Checkpoint(path, "safetensors", state)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names) and \
        any("/code/" in n for n in names)


class _ScriptObject:
    """Stands in for a TorchScript class (``__torch__.…``) while reading an archive: it only
    keeps the attributes the pickle gives it."""

    def __init__(self, *args: Any) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _storage_dtype(name: str) -> torch.dtype:
    import warnings

    storage_type = getattr(torch, name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; its dtype is all that is read
        dtype = getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"unknown storage type torch.{name}")
    return dtype


def _same(value: Any, *_: Any) -> Any:
    """``torch.jit._pickle``'s list builders and type tags: the value itself."""
    return value


JIT_PICKLE_HELPERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                      "build_complexlist", "restore_type_tag"}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's ``data.pkl``: tensors from the archive's storages, the
    module tree as :class:`_ScriptObject` placeholders; every other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name in JIT_PICKLE_HELPERS:
            return _same
        if module == "torch" and name.endswith("Storage"):
            return _storage_dtype(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a TorchScript archive's data")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60}")
        _, dtype, key, _, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("storage without a dtype")
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return flat[:numel]


def _script_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _script_tensors(value, f"{prefix}{name}.", out)


def read_torchscript(path: Path, where: str) -> Checkpoint:
    """The parameters and buffers of a TorchScript archive, by their module paths, without
    loading (compiling, running) the archive's code."""
    try:
        with zipfile.ZipFile(path) as archive:
            data_name = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
            root = _ArchiveUnpickler(archive.read(data_name), archive, data_name.split("/")[0]).load()
    except Exception as exc:  # a foreign or damaged archive: whatever the unpickler met, one line
        raise UsageError(f"{where}: a TorchScript archive whose weights cannot be read ({_first_line(exc)})") from None
    if not isinstance(root, _ScriptObject):
        raise UsageError(f"{where}: a TorchScript archive that holds no module")
    state: dict[str, torch.Tensor] = {}
    _script_tensors(root, "", state)
    return Checkpoint(path, "torchscript", state)


HARMLESS_GLOBALS: list[Any] = [
    argparse.Namespace,  # torchvision references: checkpoint["args"]
    # Lightning's hyper-parameters (``AttributeDict``, a dict subclass) are read as plain dicts
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),  # the standalone pytorch_lightning package's
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning.pytorch.utilities.parsing.AttributeDict"),
]


def read_torch_file(path: Path, where: str, *, trust_pickle: bool) -> Checkpoint:
    """A ``torch.save`` file: weights only (plus :data:`HARMLESS_GLOBALS`), or with
    ``trust_pickle`` anything pickle can hold (a whole ``nn.Module``)."""
    try:
        if trust_pickle:
            data = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(HARMLESS_GLOBALS):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError from a torn or foreign file, EOFError
        text = _first_line(exc)
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found or "weights only load failed" in str(exc).lower():
            detail = f"it holds Python objects ({found.group(1)})" if found else "it holds Python objects"
            raise UsageError(f"{where}: {detail} that weights-only loading refuses; if you trust this file, "
                             "pass --trust-pickle") from None
        raise UsageError(f"{where}: not a readable model file ({text})") from None
    if isinstance(data, nn.Module):
        return Checkpoint(path, "pickled-module", data.state_dict(), module=data)
    if isinstance(data, dict) and data.get("kind") == CHECKPOINT_KIND:
        return Checkpoint(path, "compress", dict(data["state_dict"]),
                          meta={k: v for k, v in data.items() if k != "state_dict"})
    if not isinstance(data, dict):
        raise UsageError(f"{where}: holds a {type(data).__name__}, not a state dict or a checkpoint dict")
    return Checkpoint(path, "torch", data)


# --- wrappers and prefixes ----------------------------------------------------------------------

def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def unwrap(data: dict[str, Any], key: str | None, where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a checkpoint dict, and the key it was under (None: the file is a
    state dict). Non-tensor entries next to tensors (a stray ``epoch``) are dropped."""
    if key is not None:
        value = data.get(key)
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if not _is_state_dict(value):
            found = ", ".join(k for k, v in data.items() if _is_state_dict(v)) or "none"
            raise UsageError(f"{where}: --checkpoint-key {key}: no state dict under that key "
                             f"(keys holding one: {found})")
        return value, key
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if 2 * len(tensors) > len(data):
        return tensors, None
    for name in WRAPPER_KEYS:
        if _is_state_dict(data.get(name)):
            return data[name], name
    keys = ", ".join(sorted(map(str, data))[:8])
    raise UsageError(f"{where}: no state dict found (looked for {', '.join(WRAPPER_KEYS)}; the file's keys: {keys}); "
                     "name it with --checkpoint-key")


def other_weight_keys(data: dict[str, Any], used: str | None) -> list[str]:
    """The wrapper keys besides the one used that also hold weights (told to the user)."""
    if used is None:
        return []
    return [k for k in WRAPPER_KEYS if k != used and _is_state_dict(data.get(k))]


def strip_shared_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove the leading components every key shares (``module.``, ``_orig_mod.``,
    ``model.``, ``net.``, or several of them), as DDP, torch.compile and Lightning add them."""
    stripped = ""
    while state:
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or any("." not in k for k in state):
            break
        head = next(iter(heads)) + "."
        state = {k[len(head):]: v for k, v in state.items()}
        stripped += head
    return state, stripped or None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

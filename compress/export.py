"""Export: each step to ONNX, checked, with a parity test against PyTorch.

The ONNX file is self-describing for serving: fixed tensor names (``input`` NCHW float32,
``logits``), a dynamic batch axis, and metadata props holding the class names and the
preprocessing, so a service needs nothing but the file."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from torch import nn

from .models import example_input
from .errors import ParityError
from .rundir import atomic_write_with
from .runtime.sessions import OrtModel, SessionSettings

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, path: Path, *, input_size: int, metadata: dict[str, Any], opset: int = 18) -> None:
    """Write ``model`` as ONNX (dynamic batch), run ``onnx.checker`` and embed ``metadata``
    (values JSON-encoded unless already strings)."""
    model = model.eval().cpu()

    def write(tmp: Path) -> None:
        batch = torch.export.Dim("batch", min=1, max=65536)
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(model, (example_input(input_size, batch=2),), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), opset_version=opset,
                                    dynamo=True, external_data=False, verbose=False)
        proto = program.model_proto
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))

    atomic_write_with(path, write)


PROGRAM_FILE = "model.pt2"


def export_program(model: nn.Module, path: Path, *, input_size: int) -> None:
    """Write ``model`` as a ``torch.export`` program with a dynamic batch dimension: plain
    PyTorch loads it with ``torch.export.load(path).module()``, without this package or the
    model's Python class (the pruned widths are in the graph)."""
    model = model.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example_input(input_size, batch=2),), dynamic_shapes=({0: batch},))
    atomic_write_with(path, lambda tmp: torch.export.save(program, str(tmp)))


def load_program(path: Path) -> nn.Module:
    """A ``model.pt2`` back as a callable module (its eval mode is part of the graph)."""
    return torch.export.load(str(path)).module()


def export_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """An fp16 copy of an fp32 ONNX file (onnxconverter-common) whose inputs and outputs stay
    fp32, so callers feed and read it exactly like the fp32 one."""
    import warnings

    from onnxconverter_common import float16

    proto = onnx.load(str(fp32_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float32 number ... will be truncated": expected for fp16
        half = float16.convert_float_to_float16(proto, keep_io_types=True)
    onnx.checker.check_model(half)
    atomic_write_with(fp16_path, lambda tmp: onnx.save(half, str(tmp)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata props of an ONNX file, JSON values decoded."""
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


@torch.no_grad()
def parity_check(model: nn.Module, onnx_path: Path, batches: Iterable[torch.Tensor], *, tolerance: float,
                 max_images: int = 512) -> dict[str, float]:
    """Compare PyTorch (CPU, fp32; a module or a loaded ``model.pt2``) and ONNX Runtime (CPU)
    logits on real validation images.

    Returns ``max_abs_diff``, ``top1_agreement`` and the number of images; raises
    :class:`ParityError` when the difference exceeds ``tolerance``."""
    if not isinstance(model, torch.fx.GraphModule):  # an exported program is in eval mode already
        model = model.eval()
    model = model.cpu()
    session = OrtModel(onnx_path, SessionSettings("cpu", threads=min(4, os.cpu_count() or 1)))
    max_diff, agree, seen = 0.0, 0, 0
    for images in batches:
        images = images[: max_images - seen]
        if len(images) == 0:
            break
        expected = model(images).numpy()
        actual = session.predict(images.numpy())
        max_diff = max(max_diff, float(np.abs(expected - actual).max()))
        agree += int((expected.argmax(1) == actual.argmax(1)).sum())
        seen += len(images)
        if seen >= max_images:
            break
    result = {"max_abs_diff": max_diff, "top1_agreement": agree / max(seen, 1), "images": seen, "tolerance": tolerance}
    if not max_diff <= tolerance:
        raise ParityError(f"ONNX parity failed for {onnx_path.name}: max |logit difference| {max_diff:.3g} "
                          f"> tolerance {tolerance:g} (top-1 agreement {result['top1_agreement']:.4f})")
    return result

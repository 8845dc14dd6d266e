"""Hardware hints: conv layers whose channel counts are not multiples of 8.

GPU tensor cores (fp16/bf16, and TF32) work on tiles of 8 channels; cuDNN pads or falls
back to slower kernels for other widths, so a pruned layer with 61 filters can be slower
than one with 64. The channel counts are read from the ONNX graph (weights of ``Conv`` nodes
are ``[out, in / groups, kh, kw]``), so the hints describe exactly the file that is served."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

ALIGN = 8


def conv_channels(path: Path) -> list[dict[str, Any]]:
    """``[{"layer", "in", "out", "image_input"}]`` for each Conv node of an ONNX file, in graph
    order; ``image_input`` marks a conv fed by the graph input (its 3 image channels are fixed)."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    graph_inputs = {value.name for value in model.graph.input}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in shapes:
            continue
        dims = shapes[node.input[1]]
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1) or 1
        name = node.input[1].removesuffix(".weight") if node.input[1].endswith(".weight") else node.name
        convs.append({"layer": name, "in": int(dims[1]) * group, "out": int(dims[0]),
                      "image_input": node.input[0] in graph_inputs})
    return convs


def unaligned_convs(path: Path, align: int = ALIGN) -> dict[str, Any]:
    """Tensor-core unfriendly convs of one model: out or in channels not a multiple of
    ``align`` (the image input's channels excepted: no pruning can change them)."""
    convs = conv_channels(path)
    unaligned = [{k: c[k] for k in ("layer", "in", "out")} for c in convs
                 if c["out"] % align or (c["in"] % align and not c["image_input"])]
    return {"align": align, "convs": len(convs), "unaligned": unaligned}

"""Exact rewrite: a 3x3/stride-1/pad-1 Conv or QLinearConv whose input is 1x1 spatially only ever
multiplies its kernel's centre tap by non-padding values -> make it a 1x1 conv, pad 0.
argv: in.onnx out.onnx"""
import sys, numpy as np, onnx
from onnx import numpy_helper, helper, shape_inference
m = onnx.load(sys.argv[1])
inf = shape_inference.infer_shapes(m)
shapes = {}
for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
    shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
inits = {t.name: t for t in m.graph.initializer}
folded = []
for node in m.graph.node:
    if node.op_type not in ("Conv", "QLinearConv"):
        continue
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    x = node.input[0]; w = node.input[1 if node.op_type == "Conv" else 3]
    s = shapes.get(x)
    forced = len(sys.argv) > 3 and node.name.removesuffix("_quant") in sys.argv[3].split(",")
    if not forced and (not s or len(s) != 4 or s[2:] != [1, 1]): continue
    if list(a.get("kernel_shape", [])) != [3, 3] or list(a.get("strides", [1, 1])) != [1, 1] \
            or list(a.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1] or list(a.get("dilations", [1, 1])) != [1, 1] \
            or a.get("group", 1) != 1 or w not in inits: continue
    arr = numpy_helper.to_array(inits[w])[:, :, 1:2, 1:2].copy()
    inits[w].CopyFrom(numpy_helper.from_array(arr, w))
    for at in node.attribute:
        if at.name == "kernel_shape": at.ints[:] = [1, 1]
        if at.name == "pads": at.ints[:] = [0, 0, 0, 0]
    folded.append(node.name)
onnx.save(m, sys.argv[2])
print(f"{sys.argv[1]}: folded {len(folded)} convs: {folded}")

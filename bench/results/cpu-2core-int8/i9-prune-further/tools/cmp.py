"""Outputs of pairs of ONNX files on 64 random images: max |diff| and argmax agreement. argv: a1 b1 [a2 b2 ...]"""
import sys, numpy as np, onnxruntime as ort
x = np.random.default_rng(1).normal(size=(64, 3, 32, 32)).astype(np.float32)
for a, b in zip(sys.argv[1::2], sys.argv[2::2]):
    ys = []
    for p in (a, b):
        s = ort.InferenceSession(p, providers=["CPUExecutionProvider"]); ys.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    print(b, "max|diff|", float(np.abs(ys[0] - ys[1]).max()), "argmax agree", float((ys[0].argmax(1) == ys[1].argmax(1)).mean()))

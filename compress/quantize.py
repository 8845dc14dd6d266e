"""INT8: ONNX Runtime static quantization of a step's fp32 ONNX file.

``quant_pre_process`` (shape inference, graph optimisation) first, then ``quantize_static``
with per-channel int8 weights, calibrated on training images sent through the evaluation
transform (seeded, class-stratified). Which format is fastest depends on the CPU and the model
(measured on the 2-core machine: QDQ with uint8 activations 2.2x faster than fp32, QDQ with
int8 activations 0.42x), so ``auto`` quantizes every candidate, times them here, and keeps the
fastest whose accuracy stays within the allowed drop; the manifest records what was tried.

Reduced range (7-bit weights) for the first convolution by default: x86 CPUs without VNNI (AVX2
only, like the 2-core development machine) multiply uint8 activations by int8 weights with
``vpmaddubsw``, which saturates a pair of products at 16 bits. The first convolution sees the
image itself, where many uint8 inputs sit near 255, and per-channel weights use the full int8
range, so its sums clip. Measured (ORT 1.31, QOperator and QDQ alike): on the digits demo the
max |logit difference| from fp32 fell from 0.54-1.05 to 0.14-0.26 on steps 0, 1 and 3 and top-1
agreement reached 100%; on the CIFAR-10 subset's resnet20, agreement went from 89.9% to 97.8%
(step 0). Reducing every layer's range (``all``, ONNX Runtime's advice for non-VNNI CPUs) was
less accurate than the first convolution alone (97.0%) and excluding that convolution from
quantization cost 25% of the last step's int8 speed. The latency is the same either way."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .errors import UsageError
from .rundir import atomic_write_with
from .runtime.timing import Timer, interleaved, summarize

# format name -> (quant format, activation type, weight type), as onnxruntime.quantization names them
FORMATS: dict[str, tuple[str, str, str]] = {
    "qdq-u8s8": ("QDQ", "QUInt8", "QInt8"),
    "qdq-s8s8": ("QDQ", "QInt8", "QInt8"),
    "qoperator": ("QOperator", "QUInt8", "QInt8"),
}
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# which weights are quantized to 7 bits (see the module docstring): first-conv, all, none
REDUCE_RANGE = ("first-conv", "all", "none")
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Int8Settings:
    """The int8 options of ``compress run --precisions ...,int8`` and ``compress quantize``."""

    calibration_images: int = 512
    calibration_method: str = "minmax"
    int8_format: str = "auto"
    max_accuracy_drop: float = 0.01  # fraction: 0.01 = 1 point of top-1
    seed: int = 0
    reduce_range: str = "first-conv"

    def validate(self) -> None:
        if self.calibration_images < 1:
            raise UsageError(f"--calibration-images {self.calibration_images}: at least 1 image is needed")
        if self.calibration_method not in METHODS:
            raise UsageError(f"--calibration-method {self.calibration_method!r}: choose from {', '.join(METHODS)}")
        if self.int8_format != "auto" and self.int8_format not in FORMATS:
            raise UsageError(f"--int8-format {self.int8_format!r}: choose from auto, {', '.join(FORMATS)}")
        if self.reduce_range not in REDUCE_RANGE:
            raise UsageError(f"--int8-reduce-range {self.reduce_range!r}: choose from {', '.join(REDUCE_RANGE)}")
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise UsageError("--max-accuracy-drop must be in [0, 1)")

    def candidates(self) -> list[str]:
        return list(FORMATS) if self.int8_format == "auto" else [self.int8_format]

    def calibration_record(self, images: int) -> dict[str, Any]:
        """What the manifest says about the calibration (changing it redoes the variant)."""
        return {"images": images, "asked_images": self.calibration_images, "method": self.calibration_method,
                "seed": self.seed, "source": "training split, evaluation transform, class-stratified",
                "per_channel": True, "reduce_range": self.reduce_range}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stratified_indices(labels: list[int], count: int, seed: int) -> list[int]:
    """``count`` indices drawn round-robin over the classes (each class shuffled with ``seed``),
    so every class is represented in proportion until the rarest runs out."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    queues = [list(rng.permutation(indices)) for _, indices in sorted(by_class.items())]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop()))
    return sorted(chosen)


def check_calibration(images: np.ndarray, input_shape: list[Any]) -> None:
    """Calibration images must be a non-empty float NCHW batch of the model's input size."""
    if images.ndim != 4 or len(images) == 0:
        raise UsageError("no calibration images: the calibration set is empty")
    expected = [d if isinstance(d, int) else None for d in input_shape[1:]]
    actual = list(images.shape[1:])
    if any(e is not None and e != a for e, a in zip(expected, actual)):
        raise UsageError(f"calibration images are {'x'.join(map(str, actual))} but the model takes "
                         f"{'x'.join(str(e) if e else '?' for e in expected)}; they must go through the run's preprocessing")


class _ArrayReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over an in-memory batch."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: np.ascontiguousarray(self.batches[self.position - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self.position = 0


def first_conv_weight_overrides(model: Any) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` that quantize the first convolution's weights (per output
    channel) to 7 bits; empty when the graph has no convolution."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            channels = initializers[node.input[1]].dims[0]
            return {node.input[1]: [{"axis": 0, "reduce_range": True}] + [{"reduce_range": True}] * (channels - 1)}
    return {}


def quantize_file(fp32_path: Path, out_path: Path, calibration: np.ndarray, *, fmt: str, method: str,
                  reduce_range: str = "first-conv") -> None:
    """Write the int8 twin of ``fp32_path`` (atomically); ``fmt`` from :data:`FORMATS`,
    ``reduce_range`` from :data:`REDUCE_RANGE`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_format, activations, weights = FORMATS[fmt]
    model = onnx.load(str(fp32_path), load_external_data=False)
    check_calibration(calibration, [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim])
    input_name = model.graph.input[0].name
    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime.quantization logs advice at WARNING per file
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        extra: dict[str, Any] = {}
        if reduce_range == "first-conv":
            extra["TensorQuantOverrides"] = first_conv_weight_overrides(onnx.load(str(prepared)))

        def write(tmp: Path) -> None:
            quantize_static(str(prepared), str(tmp), _ArrayReader(input_name, calibration),
                            quant_format=getattr(QuantFormat, quant_format), per_channel=True,
                            activation_type=getattr(QuantType, activations), weight_type=getattr(QuantType, weights),
                            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            reduce_range=reduce_range == "all", extra_options=extra)

        atomic_write_with(out_path, write)


def time_formats(runners: Mapping[str, Callable[[], object]], *, max_seconds: float = 6.0,
                 timer: Timer | None = None) -> dict[str, float]:
    """Median latency (ms) of each candidate, timed interleaved in this process."""
    import time

    timed = interleaved(runners, rounds=10, min_seconds=min(1.0, max_seconds), max_seconds=max_seconds,
                        timer=timer or time.perf_counter)
    return {name: summarize(samples, 1).p50_ms for name, samples in timed.samples.items()}


def pick_format(candidates: Mapping[str, Mapping[str, float]], fp32_accuracy: float,
                max_drop: float) -> tuple[str, bool]:
    """The fastest candidate (``p50_ms``) whose ``accuracy`` is within ``max_drop`` of fp32's;
    when none is, the most accurate one (then the fastest), flagged. Returns (format, within)."""
    within = [name for name, c in candidates.items() if fp32_accuracy - c["accuracy"] <= max_drop + 1e-12]
    if within:
        return min(within, key=lambda name: candidates[name]["p50_ms"]), True
    best = max(candidates, key=lambda name: (candidates[name]["accuracy"], -candidates[name]["p50_ms"]))
    return best, False

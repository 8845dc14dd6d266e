"""OpenVINO on the CPU: what a user would run instead of compressing, reading the same ONNX files.

OpenVINO's ONNX front end reads our fp32 and fp16 exports and ONNX Runtime's QDQ int8 files
(QuantizeLinear/DequantizeLinear pairs become OpenVINO's int8 kernels); it cannot read ONNX
Runtime's QOperator int8 files (QLinearConv, com.microsoft.QLinearAdd/QGemm): those are refused
with :class:`OpenVinoUnavailable` and the reason, never run under another name.

A model is compiled for the CPU with the latency hint and one stream (one request at a time, all
threads on it: the way ONNX Runtime's session runs one call), with the intra-op thread count ONNX
Runtime gets when one is given. OpenVINO chooses the inference precision itself: on CPUs with
AMX/AVX-512 BF16 it runs an fp32 file in bf16 by default (what a user gets without settings);
:meth:`OpenVinoModel.describe` reads back what it chose, so every latency says how it ran, and
the accuracy is measured through OpenVINO, not assumed. Torch-free: numpy and openvino only."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

QOPERATOR_OPS = ("QLinearConv", "QLinearAdd", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool")


class OpenVinoUnavailable(RuntimeError):
    """OpenVINO is not installed, or cannot read this file; the message says which."""


def openvino_unavailable_reason() -> str | None:
    """Why OpenVINO cannot be used here (not installed), or None when it can."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"OpenVINO is not installed ({exc}); `pip install openvino` (a dependency of this package)"
    return None


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


_CORE: Any = None


def _core() -> Any:
    """One ``openvino.Core`` per process (it holds the plugins; creating one per model is slow)."""
    global _CORE
    if _CORE is None:
        reason = openvino_unavailable_reason()
        if reason:
            raise OpenVinoUnavailable(reason)
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def _unreadable_reason(path: Path, exc: Exception) -> str:
    text = str(exc)
    qoperator = [op for op in QOPERATOR_OPS if op in text]
    if qoperator:
        return (f"OpenVINO cannot read {path.parent.name}/{path.name}: ONNX Runtime's QOperator int8 operators ({', '.join(qoperator)}) "
                "are not supported by its ONNX front end (QDQ int8 files are)")
    lines = [line for line in text.splitlines() if line.strip()]
    return f"OpenVINO cannot read {path.parent.name}/{path.name}: {lines[-1] if lines else type(exc).__name__}"


class OpenVinoModel:
    """One ONNX file compiled for OpenVINO's CPU plugin: ``predict`` (numpy in and out),
    ``timed_call`` (a fixed batch) and ``runner`` (one infer request per calling thread)."""

    def __init__(self, path: Path | str, threads: int | None = None, inference_precision: str | None = None) -> None:
        """``inference_precision``: None leaves OpenVINO's choice (bf16 on AMX/AVX-512 BF16 CPUs);
        ``"f32"`` keeps fp32 arithmetic where the file has it (answers within the export's parity
        tolerance of ONNX Runtime's, what the service needs)."""
        self.path = Path(path)
        core = _core()
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as exc:
            raise OpenVinoUnavailable(_unreadable_reason(self.path, exc)) from None
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if inference_precision:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        self.threads_asked = threads
        self.compiled = core.compile_model(model, "CPU", config)
        element = self.compiled.input(0).get_element_type()
        self.input_dtype = np.dtype(element.to_dtype()) if element.is_real() else np.dtype(np.float32)
        self._request = self.compiled.create_infer_request()

    def new_request(self) -> Any:
        """An infer request of its own (requests are not thread-safe; the compiled model is)."""
        return self.compiled.create_infer_request()

    def predict(self, images: np.ndarray, request: Any = None) -> np.ndarray:
        """(N, 3, S, S) float images -> (N, C) float32 logits."""
        batch = np.ascontiguousarray(images, dtype=self.input_dtype)
        result = (request or self._request).infer({0: batch}, share_inputs=True)  # outputs copied out (share_outputs=False)
        return result[0].astype(np.float32, copy=False)

    def timed_call(self, images: np.ndarray) -> Callable[[], object]:
        """A call on a fixed batch for timing: the input shared (no copy, as ONNX Runtime reads a
        numpy input in place), the logits copied out (as ``session.run`` returns a new array)."""
        batch = np.ascontiguousarray(images, dtype=self.input_dtype)
        request = self.new_request()
        return lambda: request.infer({0: batch}, share_inputs=True)

    def describe(self) -> dict[str, Any]:
        """What a report says about how this model ran (read back from the compiled model)."""
        def read(name: str) -> Any:
            try:
                return self.compiled.get_property(name)
            except RuntimeError:
                return None

        precision = read("INFERENCE_PRECISION_HINT")
        precision = precision.get_type_name() if hasattr(precision, "get_type_name") else precision
        return {"runtime": "openvino", "openvino": openvino_version(), "device": "CPU",
                "intra_op_threads": read("INFERENCE_NUM_THREADS") or self.threads_asked or "openvino default",
                "threads_asked": self.threads_asked or "openvino default", "num_streams": int(read("NUM_STREAMS") or 0),
                "performance_hint": str(read("PERFORMANCE_HINT")), "inference_precision": str(precision),
                "spinning": "n/a (OpenVINO's own thread pool, its defaults)"}


class OpenVinoRunner:
    """The service's runner interface (as :class:`compress.runtime.binding.BoundRunner`): ``run``
    host rows -> float32 logits, every batch size as it comes (OpenVINO reshapes in place)."""

    def __init__(self, model: OpenVinoModel, *, max_batch_size: int) -> None:
        self.model = model
        self.request = model.new_request()
        self.max_batch_size = max_batch_size
        shape = model.compiled.input(0).get_partial_shape()
        self.sample_shape = tuple(int(d.get_length()) for d in list(shape)[1:])

    def warm_up_sizes(self) -> list[int]:
        return list(range(1, self.max_batch_size + 1))

    def run(self, batch: np.ndarray) -> np.ndarray:
        rows = len(batch)
        if rows < 1:
            raise ValueError("an empty batch")
        return self.model.predict(batch.reshape((rows, *self.sample_shape)), self.request)

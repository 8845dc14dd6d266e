"""Running a session on host batches through IO binding, with device buffers made once.

Why: with plain ``session.run`` on the CUDA provider, every call allocates the input and the
output on the device and copies both ways through pageable memory; a service calls the model
thousands of times a second with batches of changing size. :class:`BoundRunner` keeps the
device buffers, so a call is one host-to-device copy into a buffer that already exists, the
model, and one device-to-host copy of the (small) logits.

Two ways to handle the changing batch sizes an adaptive batcher produces (``BATCH_SHAPES``):

- ``buckets``: a few fixed batch sizes (powers of two up to the largest batch); a batch is
  padded up to the next one. Each bucket has its input and output buffers allocated once
  by ONNX Runtime on the device, and an IO binding made once; only a handful of shapes exist,
  so warming up every one is cheap, and the addresses never change (what CUDA graphs need).
  The price is computing the padding rows.
- ``exact``: every batch runs at its own size; inputs are bound from host memory and outputs
  to the device, both taken from ONNX Runtime's memory arena (no device allocation once the
  arena has grown), and the warm-up has to visit every size from 1 to the largest.

On the CPU provider the buffers are host memory that ONNX Runtime reads and writes in place
(no copies at all in ``buckets``; ``exact`` is then a plain ``run``). Which way is faster on a
GPU is measured (``bench campaign``), not assumed. A runner is not thread-safe (an IO binding
belongs to one caller at a time): make one per thread; sessions themselves may be shared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BATCH_SHAPES = ("buckets", "exact")
_NUMPY_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size`` (which is always the last bucket)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


@dataclass
class _Bucket:
    """The buffers and the binding of one padded batch size."""

    staging: np.ndarray   # host rows, padded (the device input is updated from it in one copy)
    output_host: np.ndarray  # on CPU, the output buffer itself; on CUDA unused
    device_input: Any     # OrtValue
    device_output: Any    # OrtValue
    binding: Any          # IOBinding with both bound


def _cuda_device_id(session: Any) -> int:
    """The GPU the session's CUDA provider runs on (its ``device_id`` option): the buffers
    must live there too."""
    return int(session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))


class BoundRunner:
    """``run(batch)`` -> the first output as a float32 host array, through IO binding."""

    def __init__(self, session: Any, *, device: str, max_batch_size: int, shapes: str = "buckets") -> None:
        if shapes not in BATCH_SHAPES:
            raise ValueError(f"batch shapes must be one of {BATCH_SHAPES}, not {shapes!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {device!r}")
        self.session = session
        self.device = device
        self.device_id = _cuda_device_id(session) if device == "cuda" else 0
        self.shapes = shapes
        self.max_batch_size = max_batch_size
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name: str = model_input.name
        self.output_name: str = model_output.name
        self.input_dtype = _NUMPY_TYPES.get(model_input.type, np.dtype(np.float32))
        self.output_dtype = _NUMPY_TYPES.get(model_output.type, np.dtype(np.float32))
        self.sample_shape = tuple(int(d) for d in model_input.shape[1:])  # fixed (exports name only the batch)
        self.output_width = int(model_output.shape[1])
        self.buckets = bucket_sizes(max_batch_size)
        self._bound: dict[int, _Bucket] = {}
        self._exact_binding: Any = None

    def warm_up_sizes(self) -> list[int]:
        """The batch sizes that reach the model: each must run once before serving, because
        CUDA kernels and cuDNN's algorithm choice are set up per input shape."""
        return list(self.buckets) if self.shapes == "buckets" else list(range(1, self.max_batch_size + 1))

    def padded_size(self, rows: int) -> int:
        """The batch size the model really runs for ``rows`` rows."""
        if self.shapes == "exact":
            return rows
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"a batch of {rows} rows is over the largest batch size {self.max_batch_size}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, *sample_shape) host array -> (N, classes) float32 host array."""
        rows = len(batch)
        if rows < 1:
            raise ValueError("an empty batch")
        if self.shapes == "exact":
            return self._run_exact(batch)
        bucket = self._bucket(self.padded_size(rows))
        bucket.staging[:rows] = batch.reshape((rows, *self.sample_shape))  # casts to the model's dtype
        if self.device == "cuda":
            bucket.device_input.update_inplace(bucket.staging)  # the one host-to-device copy
        self.session.run_with_iobinding(bucket.binding)
        output = bucket.device_output.numpy() if self.device == "cuda" else bucket.output_host
        return output[:rows].astype(np.float32, copy=True)

    def _bucket(self, size: int) -> _Bucket:
        bucket = self._bound.get(size)
        if bucket is None:
            bucket = self._bound[size] = self._make_bucket(size)
        return bucket

    def _make_bucket(self, size: int) -> _Bucket:
        import onnxruntime as ort

        staging = np.zeros((size, *self.sample_shape), dtype=self.input_dtype)
        output_host = np.zeros((size, self.output_width), dtype=self.output_dtype)
        if self.device == "cuda":
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(staging.shape, self.input_dtype, "cuda", self.device_id)
            device_output = ort.OrtValue.ortvalue_from_shape_and_type(output_host.shape, self.output_dtype, "cuda", self.device_id)
        else:  # host OrtValues share the numpy arrays' memory: ORT reads and writes them in place
            device_input = ort.OrtValue.ortvalue_from_numpy(staging)
            device_output = ort.OrtValue.ortvalue_from_numpy(output_host)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_input)
        binding.bind_ortvalue_output(self.output_name, device_output)
        return _Bucket(staging, output_host, device_input, device_output, binding)

    def _run_exact(self, batch: np.ndarray) -> np.ndarray:
        host = np.ascontiguousarray(batch.reshape((len(batch), *self.sample_shape)), dtype=self.input_dtype)
        if self.device == "cpu":
            return self.session.run([self.output_name], {self.input_name: host})[0].astype(np.float32, copy=False)
        if self._exact_binding is None:
            self._exact_binding = self.session.io_binding()
            self._exact_binding.bind_output(self.output_name, "cuda", self.device_id)  # from ORT's arena, reused
        binding = self._exact_binding
        binding.bind_cpu_input(self.input_name, host)  # copied into an arena buffer on the device
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)

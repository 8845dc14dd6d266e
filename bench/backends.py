"""Backends a model can be measured on. Each one turns a model file into a predictor
(images in, logits out, for accuracy) and a timed callable on a fixed batch (for latency).

- ``ort-cpu``: ONNX Runtime CPU provider, numpy in and out.
- ``ort-cuda``: ONNX Runtime CUDA provider with IO binding (input already on the GPU, output
  kept there), so the time is the model's, not PCIe copies'. If the CUDA provider does not
  load, the backend is reported as unavailable: CPU numbers are never reported as CUDA.
- ``torch``: the PyTorch checkpoint, eager, on CUDA when available else CPU."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

BACKENDS = ("ort-cpu", "ort-cuda", "torch")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, provider failed to load); the reason is reported."""


@dataclass
class Prepared:
    """A model loaded on a backend."""

    backend: str
    device: str  # what actually runs it: CPUExecutionProvider, CUDAExecutionProvider, torch:cpu, torch:cuda
    predict: Callable[[np.ndarray], np.ndarray]  # float32 NCHW -> logits
    make_timed: Callable[[np.ndarray], Callable[[], object]]  # fixed batch -> one timed call
    info: dict[str, Any] = field(default_factory=dict)


def _ort(path: Path, provider: str, threads: int | None) -> Prepared:
    from compress.export import INPUT_NAME, OUTPUT_NAME, make_session

    if provider == "cuda":
        _preload_cuda_libraries()
    session = make_session(path, provider, threads=threads, spinning=False)
    used = session.get_providers()[0]
    if provider == "cuda" and used != "CUDAExecutionProvider":
        raise BackendUnavailable(f"ONNX Runtime's CUDA provider did not load (session runs on {used})")

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]

    def make_timed(images: np.ndarray) -> Callable[[], object]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if provider != "cuda":
            return lambda: session.run([OUTPUT_NAME], {INPUT_NAME: images})
        import onnxruntime as ort

        binding = session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
        binding.bind_ortvalue_input(INPUT_NAME, device_input)
        binding.bind_output(OUTPUT_NAME, "cuda", 0)

        def run() -> None:
            binding.synchronize_inputs()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run

    return Prepared(f"ort-{provider}", used, predict, make_timed, {"providers": session.get_providers()})


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA/cuDNN from the pip wheels once torch is imported and
    ``preload_dlls`` has run (see GPU.md)."""
    import onnxruntime as ort
    import torch  # noqa: F401  (loads the CUDA libraries onnxruntime links against)

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device")
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # the provider check below reports the real failure
            pass


def _torch(checkpoint: Path, threads: int | None) -> Prepared:
    import torch

    from compress.models import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if threads and not cuda:
        torch.set_num_threads(threads)
    model = model.to(device).eval()

    @torch.inference_mode()
    def predict(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)).float().cpu().numpy()

    def make_timed(images: np.ndarray) -> Callable[[], object]:
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)

        @torch.inference_mode()
        def run() -> object:
            out = model(batch)
            if cuda:
                torch.cuda.synchronize()
            return out

        return run

    return Prepared("torch", f"torch:{device.type}", predict, make_timed)


def prepare(backend: str, *, onnx_path: Path | None, checkpoint: Path | None, threads: int | None) -> Prepared:
    """Load one model on ``backend``; raises :class:`BackendUnavailable` with the reason."""
    if backend == "ort-cpu":
        return _ort(onnx_path, "cpu", threads)
    if backend == "ort-cuda":
        return _ort(onnx_path, "cuda", threads)
    if backend == "torch":
        if checkpoint is None or not checkpoint.exists():
            raise BackendUnavailable("no PyTorch checkpoint for this model")
        return _torch(checkpoint, threads)
    raise ValueError(f"unknown backend {backend}")

"""Backends a model can be measured on (``bench models``, the closing report, ``--target-speedup``). Each one turns a model file into a predictor
(images in, logits out, for accuracy) and a timed callable on a fixed batch (for latency).

- ``ort-cpu``: ONNX Runtime CPU provider, numpy in and out.
- ``ort-cuda``: ONNX Runtime CUDA provider with IO binding (input already on the GPU, output
  kept there), so the time is the model's, not PCIe copies'. If the CUDA provider does not
  load, the backend is reported as unavailable: CPU numbers are never reported as CUDA.
- ``torch``: the PyTorch checkpoint, eager, on CUDA when available else CPU; ``torch-cpu`` and
  ``torch-cuda`` pin the device (``torch-cuda`` is unavailable, not silently CPU, without CUDA)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError

BACKENDS = ("ort-cpu", "ort-cuda", "torch", "torch-cpu", "torch-cuda", "openvino")
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "openvino")
CPU_ONNX_BACKENDS = ("ort-cpu", "openvino")  # timed with the intra-op threads recorded for ORT CPU


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
    from .cli_support import first_line
    from .runtime.sessions import OrtModel, ProviderUnavailable, SessionSettings

    if provider == "cuda":
        import torch  # noqa: F401  (the CUDA build of onnxruntime finds its libraries once torch is loaded)
    settings = SessionSettings(provider, threads=threads, spinning=False)
    try:
        model = OrtModel(path, settings)
    except ProviderUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    except Exception as exc:  # onnxruntime's own exception types: a model this provider cannot run
        raise BackendUnavailable(f"ONNX Runtime cannot load {path.name} on {provider}: {first_line(exc)}") from None
    return Prepared(f"ort-{provider}", model.device, model.predict, model.timed_call,
                    {"providers": model.session.get_providers(), "input_type": model.input_type,
                     "session": settings.describe()})


def _openvino(path: Path, threads: int | None) -> Prepared:
    from .runtime.openvino_models import OpenVinoModel, OpenVinoUnavailable

    try:
        model = OpenVinoModel(path, threads=threads)
    except OpenVinoUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    session = model.describe()
    return Prepared("openvino", f"OpenVINO CPU ({session['inference_precision']})", model.predict, model.timed_call,
                    {"input_type": str(model.input_dtype), "session": session})


def _torch(checkpoint: Path, threads: int | None, want: str) -> Prepared:
    """``want``: "auto" (CUDA when available), "cpu" or "cuda"."""
    import torch

    from .models import load_checkpoint

    if want == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device (torch.cuda.is_available() is False)")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    model, _ = load_checkpoint(checkpoint)
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

    name = "torch" if want == "auto" else f"torch-{want}"
    return Prepared(name, f"torch:{device.type}", predict, make_timed,
                    {"threads": torch.get_num_threads() if not cuda else None})


def check_options(backends: Sequence[str], batch_sizes: Sequence[int], threads: int | None) -> None:
    """Reject bad options of a models benchmark before anything heavy is imported or loaded
    (a usage error, exit code 2)."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if not backends:
        raise UsageError("no backend given; choose from " + ", ".join(BACKENDS))
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError("batch sizes must be integers >= 1")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be >= 1")


def prepare(backend: str, *, onnx_path: Path | None, checkpoint: Path | None, threads: int | None) -> Prepared:
    """Load one model on ``backend``; raises :class:`BackendUnavailable` with the reason."""
    if backend == "ort-cpu":
        return _ort(onnx_path, "cpu", threads)
    if backend == "ort-cuda":
        return _ort(onnx_path, "cuda", threads)
    if backend == "openvino":
        return _openvino(onnx_path, threads)
    if backend in ("torch", "torch-cpu", "torch-cuda"):
        if checkpoint is None or not checkpoint.exists():
            raise BackendUnavailable("no PyTorch checkpoint for this model")
        return _torch(checkpoint, threads, backend.partition("-")[2] or "auto")
    raise ValueError(f"unknown backend {backend}")

"""Backends a model can be measured on (``bench models``, the closing report, ``--target-speedup``). Each one turns a model file into a predictor
(images in, logits out, for accuracy) and a timed callable on a fixed batch (for latency).

- ``ort-cpu``: ONNX Runtime CPU provider, numpy in and out.
- ``ort-cuda``: ONNX Runtime CUDA provider with IO binding (input already on the GPU, output
  kept there), so the time is the model's, not PCIe copies'. If the CUDA provider does not
  load, the backend is reported as unavailable: CPU numbers are never reported as CUDA.
- ``torch``: the PyTorch checkpoint, eager, on CUDA when available else CPU; ``torch-cpu`` and
  ``torch-cuda`` pin the device (``torch-cuda`` is unavailable, not silently CPU, without CUDA).
- ``torch-cuda-graphs``: the same checkpoint captured once per batch size in a CUDA graph and
  replayed: small inputs at moderate batch are launch-bound on a GPU (per-layer overhead, not
  MACs, sets the time), and a graph removes the launches, so it shows what pruning buys there.
On the CUDA torch backends ``fp16`` is the checkpoint in half precision, channels_last."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError

BACKENDS = ("ort-cpu", "ort-cuda", "torch", "torch-cpu", "torch-cuda", "torch-cuda-graphs", "openvino")
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "openvino")
CPU_ONNX_BACKENDS = ("ort-cpu", "openvino")  # timed with the intra-op threads recorded for ORT CPU
TORCH_CUDA_BACKENDS = ("torch-cuda", "torch-cuda-graphs")  # these also measure fp16 (half, channels_last)


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


def _torch(checkpoint: Path, threads: int | None, want: str, precision: str = "fp32", graphs: bool = False) -> Prepared:
    """``want``: "auto" (CUDA when available), "cpu" or "cuda"; ``graphs``: replay a CUDA graph
    captured per batch; ``precision`` fp16 (CUDA only): half weights and inputs, channels_last."""
    import torch

    from .models import load_checkpoint

    if want == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device (torch.cuda.is_available() is False)")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if precision != "fp32" and not (cuda and precision == "fp16"):
        raise BackendUnavailable(f"PyTorch {precision} is measured on CUDA only (fp16: half, channels_last)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    layout = torch.channels_last if precision == "fp16" else torch.contiguous_format
    model, _ = load_checkpoint(checkpoint)
    if threads and not cuda:
        torch.set_num_threads(threads)
    model = model.to(device=device, dtype=dtype, memory_format=layout).eval()

    def tensor(images: np.ndarray) -> "torch.Tensor":
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
        return batch.to(dtype=dtype, memory_format=layout)

    @torch.inference_mode()
    def predict(images: np.ndarray) -> np.ndarray:
        return model(tensor(images)).float().cpu().numpy()

    def make_timed(images: np.ndarray) -> Callable[[], object]:
        batch = tensor(images)
        if graphs:
            return _graph_replay(model, batch)

        @torch.inference_mode()
        def run() -> object:
            out = model(batch)
            if cuda:
                torch.cuda.synchronize()
            return out

        return run

    name = "torch-cuda-graphs" if graphs else "torch" if want == "auto" else f"torch-{want}"
    return Prepared(name, f"torch:{device.type}" + (":graph" if graphs else ""), predict, make_timed,
                    {"threads": torch.get_num_threads() if not cuda else None, "dtype": str(dtype).split(".")[-1],
                     "channels_last": precision == "fp16"})


def _graph_replay(model: Any, static_input: Any) -> Callable[[], object]:
    """Capture one forward pass of ``model`` on ``static_input`` in a CUDA graph (after warm-up
    on a side stream, as PyTorch's guide asks) and return a call that replays it."""
    import torch

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(static_input)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = model(static_input)
    torch.cuda.synchronize()

    def replay() -> object:
        graph.replay()
        torch.cuda.synchronize()
        return static_output

    return replay


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


def prepare(backend: str, *, onnx_path: Path | None, checkpoint: Path | None, threads: int | None,
            precision: str = "fp32") -> Prepared:
    """Load one model on ``backend``; raises :class:`BackendUnavailable` with the reason.
    ``precision`` picks the PyTorch dtype (ONNX Runtime reads it from ``onnx_path``)."""
    if backend == "ort-cpu":
        return _ort(onnx_path, "cpu", threads)
    if backend == "ort-cuda":
        return _ort(onnx_path, "cuda", threads)
    if backend == "openvino":
        return _openvino(onnx_path, threads)
    if backend in ("torch", "torch-cpu", "torch-cuda", "torch-cuda-graphs"):
        if checkpoint is None or not checkpoint.exists():
            raise BackendUnavailable("no PyTorch checkpoint for this model")
        graphs = backend == "torch-cuda-graphs"
        want = "cuda" if graphs else backend.partition("-")[2] or "auto"
        return _torch(checkpoint, threads, want, precision, graphs=graphs)
    raise ValueError(f"unknown backend {backend}")

"""ONNX Runtime sessions: the one place that chooses providers, their options and threads.

``provider`` is ``cpu``, ``cuda`` (CUDA or an error: a measurement or a service that asked for
the GPU must never run on the CPU under its name) or ``auto`` (CUDA when it loads, else CPU). ORT itself falls back to CPU silently when the CUDA provider cannot
load, so the provider really in use is read back from the session and reported.

:class:`OrtModel` wraps a session with what every caller needs: the tensor names, the input
dtype the file declares (an fp16 export may keep float16 inputs), ``predict`` (numpy in and
out) and ``timed_call`` (a fixed batch, with IO binding on CUDA so that a timed call is the
model's time, not host-device copies')."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("compress.runtime")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = ("cpu", "cuda", "auto")


class ProviderUnavailable(RuntimeError):
    """The asked-for provider cannot run this model here; the message says why."""


@dataclass(frozen=True)
class SessionSettings:
    """How a session runs. ``threads``: intra-op threads (None: ORT's default, one per core).
    ``spinning``: whether idle intra-op threads busy-wait for work. On (ORT's default) is
    fastest for one model alone; off is needed when several sessions take turns (an
    interleaved benchmark) or share cores with other work (the service's event loop),
    otherwise the spinning threads steal the cores the others need."""

    provider: str = "cpu"
    threads: int | None = None
    spinning: bool = True
    cuda_options: dict[str, Any] = field(default_factory=lambda: {"cudnn_conv_algo_search": "HEURISTIC"})

    def describe(self) -> dict[str, Any]:
        """What a report says about the session options a latency was measured with."""
        out: dict[str, Any] = {"provider": self.provider, "intra_op_threads": self.threads or "ort default",
                               "intra_op_spinning": self.spinning}
        if self.provider != "cpu":
            out["cuda_options"] = dict(self.cuda_options)
        return out


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it ORT's CUDA provider cannot work and
    only prints a red error before falling back, so ``auto`` goes straight to CPU."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* pip wheels (onnxruntime-gpu[cuda,cudnn]),
    so no system CUDA install is needed. With torch installed, importing torch first is what
    makes the CUDA build find them (see GPU.md); callers that have torch import it before
    this. Harmless when the libraries are absent: the provider check reports the failure."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing wheels: the provider check below reports the real failure
        logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def cuda_unavailable_reason() -> str | None:
    """Why ORT's CUDA provider cannot be used here, or None when it may be."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime has no CUDA provider (available: {', '.join(ort.get_available_providers())})"
    if not cuda_driver_present():
        return "no NVIDIA driver (libcuda.so.1 does not load): no CUDA device"
    return None


def create_session(path: Path | str, settings: SessionSettings = SessionSettings()) -> tuple[Any, str]:
    """An ``onnxruntime.InferenceSession`` and the provider it really runs on (``cuda``/``cpu``).

    Raises :class:`ProviderUnavailable` when ``cuda`` was asked for and cannot run; ``auto``
    falls back to CPU (the caller reports it: the returned provider says which). Errors loading
    the file itself propagate unchanged."""
    import onnxruntime as ort

    if settings.provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, not {settings.provider!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not settings.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if settings.threads:
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
    providers: list[Any] = [CPU]
    if settings.provider in ("cuda", "auto"):
        reason = cuda_unavailable_reason()
        if reason is None:
            preload_cuda_libraries()
            providers = [(CUDA, dict(settings.cuda_options)), CPU]
        elif settings.provider == "cuda":
            raise ProviderUnavailable(reason)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    in_use = "cuda" if session.get_providers()[0] == CUDA else "cpu"
    if settings.provider == "cuda" and in_use != "cuda":
        raise ProviderUnavailable(f"the CUDA execution provider could not be loaded for {Path(path).name} (no GPU, "
                                  "or CUDA/cuDNN libraries missing)")
    return session, in_use


class OrtModel:
    """One ONNX file in one session: names, dtype, prediction and timed calls."""

    def __init__(self, path: Path | str, settings: SessionSettings = SessionSettings()) -> None:
        self.path = Path(path)
        self.settings = settings
        self.session, self.provider = create_session(path, settings)
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_type: str = model_input.type
        self.output_name: str = self.session.get_outputs()[0].name
        self.input_dtype = np.dtype(np.float16) if model_input.type == "tensor(float16)" else np.dtype(np.float32)

    @property
    def device(self) -> str:
        """The execution provider in use, by ORT's name (what reports show)."""
        return self.session.get_providers()[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float images -> (N, C) float32 logits."""
        batch = np.ascontiguousarray(images, dtype=self.input_dtype)
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)

    def timed_call(self, images: np.ndarray) -> Callable[[], object]:
        """A call on a fixed batch for timing. On CUDA the input is copied to the device once
        and the output stays there (IO binding), so the call times the model alone."""
        batch = np.ascontiguousarray(images, dtype=self.input_dtype)
        if self.provider != "cuda":
            return lambda: self.session.run([self.output_name], {self.input_name: batch})
        import onnxruntime as ort

        binding = self.session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding.bind_ortvalue_input(self.input_name, device_input)
        binding.bind_output(self.output_name, "cuda", 0)

        def run() -> None:
            binding.synchronize_inputs()
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run

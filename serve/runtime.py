"""The models behind the service: registered ONNX files, one ONNX Runtime session each.

A :class:`ModelCard` is what the store says about a model (read by both services); a
:class:`Member` adds its session. Sessions try the CUDA execution provider first (cuDNN
convolution algorithm search HEURISTIC: EXHAUSTIVE would benchmark every algorithm for
every new batch shape that adaptive batching produces, stalling requests) and fall back to
CPU with a logged warning; the provider really in use is reported, because ORT falls back
silently when the CUDA libraries cannot be loaded."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import InputLayout, Preprocessing
from .settings import ConfigError
from .voting import softmax

logger = logging.getLogger("serve")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelCard:
    """A registered model as the store describes it (``compress register`` metadata)."""

    tag: str
    path: Path
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    metadata: dict[str, Any] = field(compare=False)

    def file(self, precision: str) -> Path:
        files = self.metadata.get("files") or {"fp32": "model.onnx"}
        if precision not in files:
            raise ConfigError(f"{self.tag} has no {precision} export (it has: {', '.join(files)}); "
                              f"set SERVE_PRECISION=fp32 or register a run exported with {precision}")
        return self.path / files[precision]

    def summary(self) -> dict[str, Any]:
        """Metrics shown by the metadata endpoint."""
        keys = ("arch", "step", "accuracy", "accuracy_step0", "macs", "params", "macs_ratio", "params_ratio", "latency")
        return {"tag": self.tag, **{k: self.metadata[k] for k in keys if k in self.metadata},
                "input_size": self.preprocessing.input_size}


def load_card(tag: str) -> ModelCard:
    """Read a model's card from the BentoML model store, with a clear error when it is not
    there or was not stored by ``compress register``."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ConfigError(f"model {tag!r} (from SERVE_MODELS) is not in the BentoML model store "
                          f"{os.environ.get('BENTOML_HOME', '~/bentoml')}/models; register it with "
                          f"`compress register RUN_DIR` or see `bentoml models list`") from None
    except (BentoMLException, ValueError) as exc:
        raise ConfigError(f"SERVE_MODELS entry {tag!r}: {exc}") from None
    return card_from_model(model)


def card_from_model(model: Any) -> ModelCard:
    """The card of a stored ``bentoml.Model``."""
    metadata = dict(model.info.metadata)
    missing = [k for k in ("classes", "preprocessing") if k not in metadata]
    if missing:
        raise ConfigError(f"model {model.tag} has no {' or '.join(missing)} in its metadata: it was not stored by "
                          f"`compress register`")
    return ModelCard(str(model.tag), Path(model.path), tuple(metadata["classes"]),
                     Preprocessing.from_dict(metadata["preprocessing"]), metadata)


def check_classes(cards: Sequence[ModelCard]) -> tuple[str, ...]:
    """Members of an ensemble must predict the same classes in the same order."""
    first = cards[0]
    for card in cards[1:]:
        if card.classes != first.classes:
            raise ConfigError(f"ensemble members must share class names: {first.tag} has {list(first.classes)}, "
                              f"{card.tag} has {list(card.classes)}")
    return first.classes


def create_session(path: Path, provider: str, *, threads: int = 0) -> tuple[Any, str]:
    """An ONNX Runtime session and the provider it really runs on (``cuda`` or ``cpu``).

    ``provider`` ``auto`` and ``cuda`` try CUDA first; ``cuda`` insists (error if it cannot
    load), ``auto`` falls back to CPU with a warning. Idle threads do not spin: the event loop
    that parses and decodes requests needs the same cores between model calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers: list[Any] = [CPU]
    if provider in ("auto", "cuda"):
        if CUDA in ort.get_available_providers() and (provider == "cuda" or _cuda_driver_present()):
            _preload_cuda_libraries(ort)
            providers = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
        elif provider == "cuda":
            raise ConfigError(f"SERVE_PROVIDER=cuda but this onnxruntime has no CUDA provider "
                              f"(available: {ort.get_available_providers()}); install onnxruntime-gpu")
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    in_use = "cuda" if session.get_providers()[0] == CUDA else "cpu"
    if provider in ("auto", "cuda") and in_use != "cuda":
        if provider == "cuda":
            raise ConfigError(f"SERVE_PROVIDER=cuda but the CUDA execution provider could not be loaded for {path} "
                              f"(no GPU, or CUDA/cuDNN libraries missing); use SERVE_PROVIDER=auto to allow CPU")
        logger.warning("CUDA execution provider unavailable for %s (no GPU or CUDA/cuDNN libraries missing): "
                       "serving on CPU", path)
    return session, in_use


def _cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it ORT's CUDA provider cannot work and
    only prints a red error before falling back, so ``auto`` goes straight to CPU."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* pip wheels (onnxruntime-gpu[cuda,cudnn]),
    so no system CUDA install is needed; harmless when they are absent."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing wheels: ORT falls back to CPU and we log that later
        logger.debug("onnxruntime.preload_dlls failed: %s", exc)


@dataclass
class Member:
    """One model of the service with its session."""

    card: ModelCard
    session: Any
    provider: str
    input_name: str
    output_name: str
    input_dtype: np.dtype

    @classmethod
    def load(cls, card: ModelCard, *, provider: str, precision: str = "fp32", threads: int = 0) -> Member:
        session, in_use = create_session(card.file(precision), provider, threads=threads)
        model_input = session.get_inputs()[0]
        dtype = np.dtype(np.float16) if model_input.type == "tensor(float16)" else np.dtype(np.float32)
        output = card.metadata.get("output_name") or session.get_outputs()[0].name
        return cls(card, session, in_use, model_input.name, output, dtype)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) float32 probabilities."""
        logits = self.session.run([self.output_name], {self.input_name: batch.astype(self.input_dtype, copy=False)})[0]
        return softmax(logits.astype(np.float32, copy=False))


class Ensemble:
    """All members behind one predict call: packed rows in, (N, M, C) probabilities out."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.classes = check_classes([m.card for m in self.members])
        self.layout = InputLayout([m.card.preprocessing for m in self.members])

    @classmethod
    def load(cls, tags: Sequence[str], *, provider: str, precision: str = "fp32", threads: int = 0) -> Ensemble:
        cards = [load_card(tag) for tag in tags]
        check_classes(cards)  # before paying for sessions
        return cls([Member.load(card, provider=provider, precision=precision, threads=threads) for card in cards])

    def predict(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), len(self.members), len(self.classes)), dtype=np.float32)
        for index, member in enumerate(self.members):
            out[:, index, :] = member.probabilities(self.layout.unpack(rows, index))
        return out

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every batch size once so that the first requests do not pay for lazy
        initialisation (CUDA kernels and cuDNN algorithm choice are per input shape)."""
        for size in batch_sizes:
            self.predict(np.zeros((size, self.layout.width), dtype=np.float32))

    def providers(self) -> dict[str, str]:
        return {m.card.tag: m.provider for m in self.members}

"""The models behind the service: registered ONNX files, one ONNX Runtime session each.

A :class:`ModelCard` is what the store says about a model; a :class:`Member` adds its session.
Sessions come from the shared runtime layer (``compress.runtime``, torch-free): CUDA execution
provider first (cuDNN convolution algorithm search HEURISTIC: EXHAUSTIVE would benchmark every
algorithm for every new batch shape that adaptive batching produces, stalling requests), CPU
fallback with a logged warning; the provider really in use is reported, because ORT falls
back silently when the CUDA libraries cannot be loaded."""
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
                              f"set SERVE_PRECISION=fp32, or add the variant (`compress run --precisions fp32,{precision}` or "
                              f"`compress quantize RUN_DIR --precisions {precision}`) and register the step again")
        return self.path / files[precision]

    def summary(self) -> dict[str, Any]:
        """Metrics shown by the metadata endpoint."""
        keys = ("arch", "step", "accuracy", "accuracy_step0", "macs", "params", "macs_ratio", "params_ratio", "latency", "variants")
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
    """An ONNX Runtime session (through the shared runtime layer) and the provider it really
    runs on. Idle threads do not spin: the event loop that parses and decodes requests needs
    the same cores between model calls. A provider that cannot run becomes a ConfigError."""
    from compress.runtime.sessions import ProviderUnavailable, SessionSettings
    from compress.runtime.sessions import create_session as runtime_session

    try:
        session, in_use = runtime_session(path, SessionSettings(provider, threads=threads or None, spinning=False))
    except ProviderUnavailable as exc:
        raise ConfigError(f"SERVE_PROVIDER=cuda but {exc}; use SERVE_PROVIDER=auto to allow CPU, or install "
                          f"onnxruntime-gpu with its CUDA libraries on a GPU machine") from None
    if provider == "auto" and in_use != "cuda":
        logger.warning("CUDA execution provider unavailable for %s (no GPU or CUDA/cuDNN libraries missing): "
                       "serving on CPU", path)
    return session, in_use


@dataclass
class Member:
    """One model of the service with its session."""

    card: ModelCard
    session: Any
    provider: str
    input_name: str
    output_name: str
    input_dtype: np.dtype
    precision: str = "fp32"

    @classmethod
    def load(cls, card: ModelCard, *, provider: str, precision: str = "fp32", threads: int = 0) -> Member:
        session, in_use = create_session(card.file(precision), provider, threads=threads)
        model_input = session.get_inputs()[0]
        dtype = np.dtype(np.float16) if model_input.type == "tensor(float16)" else np.dtype(np.float32)
        output = card.metadata.get("output_name") or session.get_outputs()[0].name
        return cls(card, session, in_use, model_input.name, output, dtype, precision)

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

    def precisions(self) -> dict[str, str]:
        return {m.card.tag: m.precision for m in self.members}

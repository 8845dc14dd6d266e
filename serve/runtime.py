"""The models behind the service: registered ONNX files, one ONNX Runtime session each (or, with
``SERVE_RUNTIME=openvino``, one OpenVINO compiled model each, an infer request per model thread).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from compress.runtime.binding import BoundRunner

from .inputs import InputLayout, Preprocessing
from .settings import ConfigError, Settings
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


@dataclass(frozen=True)
class RuntimeOptions:
    """How a worker runs its models (from ``serve.settings``; see there for each option)."""

    provider: str = "auto"
    precision: str = "fp32"
    threads: int = 0                 # intra-op threads on CPU (0: the runtime's choice)
    model_threads: int = 1           # model calls in flight at once
    sessions: str = "shared"         # or "per-thread"
    batch_shapes: str = "auto"       # buckets on CUDA, exact on CPU
    max_batch_size: int = 64
    cuda_options: dict[str, str] = field(default_factory=lambda: {"cudnn_conv_algo_search": "HEURISTIC"})
    runtime: str = "onnxruntime"     # or "openvino" (CPU)

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        return cls(settings.provider, settings.precision, settings.threads, settings.model_threads, settings.sessions,
                   settings.batch_shapes, settings.max_batch_size, settings.cuda_options(), settings.runtime)

    def on_gpu(self, device_id: int) -> RuntimeOptions:
        """These options with the CUDA provider on visible GPU ``device_id`` (``serve/devices.py``)."""
        return replace(self, cuda_options={**self.cuda_options, "device_id": str(device_id)})

    def shapes_on(self, provider: str) -> str:
        if self.batch_shapes != "auto":
            return self.batch_shapes
        return "buckets" if provider == "cuda" else "exact"

    def describe(self, provider: str) -> dict[str, Any]:
        """What /metadata says about how the models run."""
        return {"engine": self.runtime, "model_threads": self.model_threads, "sessions": self.sessions,
                "batch_shapes": self.shapes_on(provider), "intra_op_threads": self.threads or None,
                "cuda_options": dict(self.cuda_options) if provider == "cuda" else None}


def create_session(path: Path, options: RuntimeOptions) -> tuple[Any, str]:
    """An ONNX Runtime session (through the shared runtime layer) and the provider it really
    runs on. Idle threads do not spin: the event loop that parses and decodes requests needs
    the same cores between model calls. A provider that cannot run becomes a ConfigError."""
    from compress.runtime.sessions import ProviderUnavailable, SessionSettings
    from compress.runtime.sessions import create_session as runtime_session

    settings = SessionSettings(options.provider, threads=options.threads or None, spinning=False,
                               cuda_options=dict(options.cuda_options))
    try:
        session, in_use = runtime_session(path, settings)
    except ProviderUnavailable as exc:
        raise ConfigError(f"SERVE_PROVIDER=cuda but {exc}; use SERVE_PROVIDER=auto to allow CPU, or install "
                          f"onnxruntime-gpu with its CUDA libraries on a GPU machine") from None
    if options.provider == "auto" and in_use != "cuda":
        logger.warning("CUDA execution provider unavailable for %s (no GPU or CUDA/cuDNN libraries missing): "
                       "serving on CPU", path)
    return session, in_use


@dataclass
class Member:
    """One model of the service: its session(s) and one IO-bound runner per model thread
    (``slot``). With ``sessions=shared`` every runner uses the same session (ONNX Runtime
    sessions are thread-safe; the bindings are not, hence a runner each)."""

    card: ModelCard
    runners: list[Any]  # BoundRunner, or OpenVinoRunner (the same run / warm_up_sizes)
    provider: str
    precision: str = "fp32"
    engine: dict[str, Any] = field(default_factory=lambda: {"engine": "onnxruntime"})

    @classmethod
    def load(cls, card: ModelCard, options: RuntimeOptions) -> Member:
        path = card.file(options.precision)
        if options.runtime == "openvino":
            return cls.load_openvino(card, path, options)
        session, in_use = create_session(path, options)
        sessions = [session]
        if options.sessions == "per-thread":
            sessions += [create_session(path, options)[0] for _ in range(options.model_threads - 1)]
        shapes = options.shapes_on(in_use)
        runners = [BoundRunner(sessions[slot % len(sessions)], device=in_use, max_batch_size=options.max_batch_size,
                               shapes=shapes) for slot in range(options.model_threads)]
        return cls(card, runners, in_use, options.precision)

    @classmethod
    def load_openvino(cls, card: ModelCard, path: Path, options: RuntimeOptions) -> Member:
        """One compiled model (thread-safe), an infer request per model thread. fp32 arithmetic where
        the file has it (OpenVINO would pick bf16 on AMX CPUs): the answers stay within the export's
        parity tolerance of ONNX Runtime's."""
        from compress.runtime.openvino_models import OpenVinoModel, OpenVinoRunner, OpenVinoUnavailable

        try:
            model = OpenVinoModel(path, threads=options.threads or None, inference_precision="f32")
        except OpenVinoUnavailable as exc:
            raise ConfigError(f"SERVE_RUNTIME=openvino: {exc}; serve {card.tag} with SERVE_RUNTIME=onnxruntime") from None
        runners = [OpenVinoRunner(model, max_batch_size=options.max_batch_size) for _ in range(options.model_threads)]
        return cls(card, runners, "cpu", options.precision, model.describe())

    def probabilities(self, batch: np.ndarray, slot: int = 0) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) float32 probabilities, on model thread ``slot``."""
        return softmax(self.runners[slot].run(batch))


class Ensemble:
    """All members behind one predict call: packed rows in, (N, M, C) probabilities out."""

    def __init__(self, members: Sequence[Member], options: RuntimeOptions = RuntimeOptions()) -> None:
        self.members = list(members)
        self.options = options
        self.classes = check_classes([m.card for m in self.members])
        self.layout = InputLayout([m.card.preprocessing for m in self.members])

    @classmethod
    def load(cls, tags: Sequence[str], options: RuntimeOptions) -> Ensemble:
        cards = [load_card(tag) for tag in tags]
        check_classes(cards)  # before paying for sessions
        return cls([Member.load(card, options) for card in cards], options)

    def predict(self, rows: np.ndarray, slot: int = 0) -> np.ndarray:
        """Packed rows -> (N, M, C) probabilities, on model thread ``slot`` (0 .. model_threads - 1)."""
        out = np.empty((len(rows), len(self.members), len(self.classes)), dtype=np.float32)
        for index, member in enumerate(self.members):
            out[:, index, :] = member.probabilities(self.layout.unpack(rows, index), slot)
        return out

    def warm_up_sizes(self) -> list[int]:
        """Every batch size the models will run (the union over members: buckets or all sizes)."""
        return sorted({size for m in self.members for size in m.runners[0].warm_up_sizes()})

    def warm_up(self) -> list[int]:
        """Run every batch size the batcher can produce once on every model thread, so that no
        request pays for lazy initialisation (buffers and bindings, CUDA kernels and cuDNN's
        algorithm choice, all per input shape; OpenVINO's first call at a new batch size, 5-15 ms
        more than the next on the digits demo's step 3). On ONNX Runtime's CPU provider one size
        suffices: nothing is per shape there beyond ORT's own first-call setup. Returns the sizes run."""
        per_shape = self.options.runtime == "openvino" or any(m.provider == "cuda" for m in self.members)
        sizes = self.warm_up_sizes() if per_shape else [1]
        for slot in range(self.options.model_threads):
            for size in sizes:
                self.predict(np.zeros((size, self.layout.width), dtype=np.float32), slot)
        return sizes

    def providers(self) -> dict[str, str]:
        return {m.card.tag: m.provider for m in self.members}

    def precisions(self) -> dict[str, str]:
        return {m.card.tag: m.precision for m in self.members}

    def runtime(self) -> dict[str, Any]:
        provider = "cuda" if any(m.provider == "cuda" for m in self.members) else "cpu"
        described = self.options.describe(provider)
        if self.options.runtime == "openvino":  # how OpenVINO compiled each member (threads, precision it chose)
            described["openvino"] = {m.card.tag: m.engine for m in self.members}
        return described

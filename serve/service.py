"""The HTTP service: ``bentoml serve`` (bentofile.yaml names ``serve.service:Classifier``).

Two BentoML services, because BentoML batches only calls that arrive through a service's
API: ``Classifier`` (the HTTP front) decodes and preprocesses uploads and combines votes;
``ClassifierModels`` holds one ONNX Runtime session per model and exposes a batchable array
API, so requests that arrive together are merged into one model call of up to
``max_batch_size`` rows: batches grow with load, and GPU throughput with them. The front
calls it over a local Unix socket.

Which models: ``SERVE_MODELS`` (see ``serve/settings.py`` for every variable). The tags are
resolved when this module is imported, so ``bentoml build`` packs exactly those models into
the Bento and bakes the resolved tags into its environment; a container then serves them
with no configuration."""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import bentoml
import numpy as np
from starlette.responses import JSONResponse

from serve.guard import UploadGuard, UploadRule
from serve.inputs import BadInput, InputLayout, decode_image
from serve.runtime import Ensemble, check_classes, load_card
from serve.settings import ConfigError, Settings
from serve.voting import prediction

logger = logging.getLogger("serve")
logger.setLevel(logging.INFO)

SETTINGS = Settings.from_env()
CALL_ATTEMPTS = 3


def _serving_from_cli() -> bool:
    """Whether this process is ``bentoml serve`` (not ``bentoml build``, not an import)."""
    return Path(sys.argv[0]).name in ("bentoml", "__main__.py") and sys.argv[1:2] == ["serve"]


def _resolve_tags(settings: Settings) -> tuple[str, ...]:
    """Full ``name:version`` tags of ``SERVE_MODELS``; fails early (at import, so before any
    worker starts) when a tag is missing or the members' classes differ. Unset is allowed
    for ``bentoml build`` (a Bento without models) but stops ``bentoml serve`` at once:
    otherwise its workers would fail and be restarted forever."""
    if not settings.models:
        if _serving_from_cli():
            settings.require_models()
        return ()
    cards = [load_card(tag) for tag in settings.models]
    check_classes(cards)
    return tuple(card.tag for card in cards)


TAGS = _resolve_tags(SETTINGS)


def _member_tags(settings: Settings) -> tuple[str, ...]:
    """The tags resolved at import, so that every process serves the same versions even if
    a newer version of a ``name``-only tag is registered while the service starts."""
    return TAGS or settings.require_models()

ENVS = [{"name": "SERVE_MODELS", "value": ",".join(TAGS)}] if TAGS else []


class ClassifierModels:
    """All members' ONNX Runtime sessions behind one batchable array API."""

    def __init__(self) -> None:
        settings = Settings.from_env()
        self.settings = settings
        self.ensemble = Ensemble.load(_member_tags(settings), provider=settings.provider,
                                      precision=settings.precision, threads=settings.threads)
        on_gpu = any(p == "cuda" for p in self.ensemble.providers().values())
        sizes = [1] if not on_gpu else sorted({min(2 ** i, settings.max_batch_size) for i in range(8)})
        self.ensemble.warm_up(sizes)
        logger.info("serving %s (%s) on %s", ", ".join(self.ensemble.providers()),
                    settings.voting if len(self.ensemble.members) > 1 else "single model",
                    ", ".join(sorted(set(self.ensemble.providers().values()))))

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def predict(self, rows: np.ndarray) -> np.ndarray:
        """(N, width) packed images (see ``InputLayout``) -> (N, members, classes) probabilities."""
        return self.ensemble.predict(np.asarray(rows, dtype=np.float32))

    @bentoml.api
    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"providers": self.ensemble.providers(), "onnxruntime": ort.__version__,
                "available_providers": ort.get_available_providers(), "layout_width": self.ensemble.layout.width}


# Declared as class attributes so that `bentoml build` packs the models into the Bento.
for _index, _tag in enumerate(TAGS):
    setattr(ClassifierModels, f"model_{_index}", bentoml.models.BentoModel(_tag))

# runner_connection: BentoML's client to this service replaces its HTTP session every 100
# calls (or 5 minutes) by closing the old one under the calls in flight on it, which fail
# with "Server disconnected" (1.4.39; upstream bentoml/BentoML#5540): keep one session.
Models = bentoml.service(name="ClassifierModels", workers=1, envs=ENVS, traffic={"timeout": 60},
                         runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
                         logging={"access": {"enabled": False}})(ClassifierModels)


def _bad_input(exc: BadInput) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@bentoml.service(name="Classifier", workers=SETTINGS.workers, envs=ENVS, traffic={"timeout": 60},
                  logging={"access": {"enabled": SETTINGS.access_log}})
class Classifier:
    """``POST /classify`` (field ``image``), ``POST /classify_batch`` (field ``images``),
    ``GET|POST /metadata``; BentoML's ``/livez``, ``/readyz`` and ``/metrics`` stay on."""

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        settings = Settings.from_env()
        self.settings = settings
        self.cards = [load_card(tag) for tag in _member_tags(settings)]
        self.classes = list(check_classes(self.cards))
        self.layout = InputLayout([card.preprocessing for card in self.cards])
        tags = [card.tag for card in self.cards]
        self.model_name = tags[0] if len(tags) == 1 else f"{settings.voting}-vote({','.join(tags)})"
        self.top_k = min(settings.top_k, len(self.classes))

    def _prepare(self, files: list[Path], names: list[str]) -> np.ndarray:
        """Read, decode and preprocess uploads (in a worker thread: decoding is CPU work)."""
        images = [decode_image(path.read_bytes(), max_bytes=self.settings.max_bytes,
                               max_pixels=self.settings.max_pixels, name=name) for path, name in zip(files, names)]
        return self.layout.pack(images)

    async def _call_models(self, chunk: np.ndarray) -> np.ndarray:
        """One call to the model service, retried on a dropped connection (a pooled keep-alive
        connection the server has just closed; BentoML's client does not retry, upstream
        bentoml/BentoML#4971). Prediction is idempotent, so retrying is safe."""
        for attempt in range(CALL_ATTEMPTS):
            try:
                return np.asarray(await self.models.to_async.predict(chunk))
            except aiohttp.ClientConnectionError as exc:
                if attempt == CALL_ATTEMPTS - 1:
                    raise
                logger.warning("model service connection dropped (%s); retrying", exc)
        raise AssertionError("unreachable")

    async def _predict(self, rows: np.ndarray) -> np.ndarray:
        """Send rows to the model service, in chunks of at most ``max_batch_size``."""
        size = self.settings.max_batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        results = await asyncio.gather(*(self._call_models(chunk) for chunk in chunks))
        return np.concatenate(results, axis=0)

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        return prediction(probs, self.classes, voting=self.settings.voting, top_k=self.top_k, model=self.model_name)

    @bentoml.api(route="/classify")
    async def classify(self, image: Path) -> dict[str, Any]:
        """Classify one image: ``{"label", "class_index", "confidence", "top_k", "model"[, "votes"]}``."""
        try:
            rows = await anyio.to_thread.run_sync(self._prepare, [image], ["image"])
        except BadInput as exc:
            return _bad_input(exc)  # type: ignore[return-value]  # BentoML sends a Response as is
        probs = await self._predict(rows)
        return self._answer(probs[0])

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path]) -> list[dict[str, Any]]:
        """Classify several images (repeated field ``images``): one answer per image, in order."""
        if len(images) > self.settings.max_files:
            return _bad_input(BadInput(f"{len(images)} images, over the limit of {self.settings.max_files}", 413))  # type: ignore[return-value]
        try:
            names = [f"images[{index}]" for index in range(len(images))]
            rows = await anyio.to_thread.run_sync(self._prepare, list(images), names)
        except BadInput as exc:
            return _bad_input(exc)  # type: ignore[return-value]
        probs = await self._predict(rows)
        return [self._answer(p) for p in probs]

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict[str, Any]:
        """Models (with accuracy, MACs, parameters, latency), classes, voting, providers, limits."""
        info = await self.models.to_async.info()
        return {
            "model": self.model_name,
            "models": [card.summary() for card in self.cards],
            "classes": self.classes,
            "voting": self.settings.voting if len(self.cards) > 1 else None,
            "providers": info["providers"],
            "onnxruntime": info["onnxruntime"],
            "input_sizes": sorted({card.preprocessing.input_size for card in self.cards}),
            "limits": {"max_bytes": self.settings.max_bytes, "max_pixels": self.settings.max_pixels,
                       "max_files": self.settings.max_files, "max_batch_size": self.settings.max_batch_size},
        }


Classifier.add_asgi_middleware(
    UploadGuard,
    rules={"/classify": UploadRule("image", 1), "/classify_batch": UploadRule("images", SETTINGS.max_files)},
    max_file_bytes=SETTINGS.max_bytes,
    get_as_post=("/metadata",),
)

__all__ = ["Classifier", "ConfigError", "Models"]

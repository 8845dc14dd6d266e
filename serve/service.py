"""The HTTP service: ``bentoml serve`` (bentofile.yaml names ``serve.service:Classifier``).

One BentoML service. Each worker process holds one ONNX Runtime session per model and an
:class:`~serve.batching.AdaptiveBatcher`: requests that arrive while the model is busy are
merged into its next call of up to ``max_batch_size`` rows, so batches grow with load (and
GPU throughput with them) with no extra hop between processes. Small uploads are decoded on
the event loop (cheaper than a thread hop), large ones in a worker thread, a few at a time.
The models load in the background: ``/livez`` answers at once, ``/readyz`` (and the APIs,
with 503) once they are loaded. ``serve/guard.py`` bounds every request body in size and
time before BentoML sees it; ``serve/metrics.py`` says what ``/metrics`` adds.

Which models: ``SERVE_MODELS`` (see ``serve/settings.py`` for every variable). The tags are
resolved when this module is imported, so ``bentoml build`` packs exactly those models into
the Bento and bakes the resolved tags into its environment; a container then serves them
with no configuration."""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from serve import devices, metrics, openapi, stack, tracing, workers
from serve.batching import AdaptiveBatcher
from serve.guard import BodyBudget, UploadGuard, UploadRule
from serve.inputs import INLINE_DECODE_PIXELS, BadInput, decode_opened, open_image
from serve.runtime import Ensemble, ModelCard, RuntimeOptions, check_classes, load_card
from serve.settings import AUTO, PER_GPU, ConfigError, Settings
from serve.voting import prediction

logger = logging.getLogger("serve")
logger.setLevel(logging.INFO)

SETTINGS = Settings.from_env()


def _serving_from_cli() -> bool:
    """Whether this process is ``bentoml serve`` (not ``bentoml build``, not an import)."""
    return Path(sys.argv[0]).name in ("bentoml", "__main__.py") and sys.argv[1:2] == ["serve"]


def _resolve_cards(settings: Settings) -> list[ModelCard]:
    """The cards of ``SERVE_MODELS``; fails early (at import, so before any worker starts)
    when a tag is missing or the members' classes differ. Unset is allowed for ``bentoml
    build`` (a Bento without models) but stops ``bentoml serve`` at once: otherwise its
    workers would fail and be restarted forever."""
    if not settings.models:
        if _serving_from_cli():
            settings.require_models()
        return []
    cards = [load_card(tag) for tag in settings.models]
    check_classes(cards)
    return cards


def _worker_plan(settings: Settings, cards: list[ModelCard]) -> workers.WorkerPlan | None:
    """For ``SERVE_WORKERS=auto``, the plan of ``serve/workers.py`` for these models."""
    if settings.workers != AUTO:
        return None
    return workers.plan([card.file(settings.precision) for card in cards], max_pixels=settings.max_pixels)


def _gpus(settings: Settings) -> list[devices.Gpu]:
    """The GPUs the workers spread over: none where the models cannot run on CUDA
    (``SERVE_PROVIDER=cpu``, ``SERVE_RUNTIME=openvino``, or an ONNX Runtime without the CUDA
    provider, as in the CPU image)."""
    if settings.provider == "cpu" or settings.runtime == "openvino":
        return []
    import onnxruntime as ort

    from compress.runtime.sessions import CUDA

    return devices.visible_gpus() if CUDA in ort.get_available_providers() else []


CARDS = _resolve_cards(SETTINGS)
TAGS = tuple(card.tag for card in CARDS)
WORKER_PLAN = _worker_plan(SETTINGS, CARDS)
GPUS = _gpus(SETTINGS)
WORKERS = (WORKER_PLAN.workers if WORKER_PLAN is not None
           else devices.default_workers(GPUS) if SETTINGS.workers == PER_GPU else SETTINGS.workers)


def _member_tags(settings: Settings) -> tuple[str, ...]:
    """The tags resolved at import, so that every process serves the same versions even if
    a newer version of a ``name``-only tag is registered while the service starts."""
    return TAGS or settings.require_models()


ENVS = [{"name": "SERVE_MODELS", "value": ",".join(TAGS)}] if TAGS else []
UPLOAD_ROUTES = ("/classify", "/classify_batch")
API_ROUTES = (*UPLOAD_ROUTES, "/metadata")
SYSTEM_ROUTES = ("/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json")
TRAFFIC_TIMEOUT = 60.0
"""Seconds to answer a request (BentoML's ``traffic.timeout``, and the guard's for the uploads it answers)."""
MULTIPART_FRAMING = 64 * 1024
"""Room for part headers and boundaries on top of the image bytes of a ``/classify`` body."""

if _serving_from_cli():
    metrics.use_private_multiproc_dir("Classifier")
metrics.bound_endpoint_labels(API_ROUTES + SYSTEM_ROUTES)
tracing.skip_unexported_spans()
stack.guard_after_metrics(UploadGuard)


Upload = Path | UploadFile
"""An uploaded file: BentoML's temporary copy (the API) or the guard's parsed part (the
direct path, see ``serve/guard.py``)."""

SERVER_HEADER = "BentoML Service/Classifier"
"""What BentoML's API wrapper sends as ``Server``; the direct path sends the same."""


def _answer(body: Any, status: int = 200) -> JSONResponse:
    """A JSON response sent as is: BentoML would otherwise rebuild the API's JSON schema for
    every answer (measured: about a tenth of the CPU per request on the digits model)."""
    return JSONResponse(body, status_code=status)


def _read(upload: Upload) -> bytes:
    if isinstance(upload, UploadFile):
        upload.file.seek(0)
        return upload.file.read()
    return upload.read_bytes()


def _bad_input(exc: BadInput) -> JSONResponse:
    metrics.count_rejection(exc.reason)
    return _answer({"error": str(exc)}, exc.status)


def _not_ready(error: str | None) -> JSONResponse:
    metrics.count_rejection("not_ready")
    message = f"the models failed to load: {error}" if error else "the models are still loading: retry shortly"
    response = _answer({"error": message}, 503)
    response.headers["retry-after"] = "1"
    return response


def _bentoml_headers(response: JSONResponse) -> JSONResponse:
    """The headers BentoML's API wrapper adds: ``Server`` and ``X-BentoML-Request-ID``."""
    response.headers["server"] = SERVER_HEADER
    response.headers["x-bentoml-request-id"] = tracing.request_id()
    return response


def _direct_handler(path: str) -> Any:
    """The guard's handler for an upload endpoint: the service instance's direct method, once
    BentoML has created the instance (before that, None: the request goes through the API)."""
    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return None
    return service.classify_direct if path == "/classify" else service.classify_batch_direct


class Classifier:
    """``POST /classify`` (field ``image``), ``POST /classify_batch`` (field ``images``),
    ``GET|POST /metadata``; BentoML's ``/livez``, ``/readyz`` and ``/metrics`` stay on."""

    def __init__(self) -> None:
        settings = Settings.from_env()
        self.settings = settings
        self.metrics = metrics.service_metrics(settings.max_batch_size)
        # Large decodes run in threads, at most this many at once: each holds a full-size image.
        self.decode_limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        self.ready = False
        self.load_error: str | None = None
        threading.Thread(target=self._load, args=(settings,), name="load-models", daemon=True).start()

    def _load(self, settings: Settings) -> None:
        """Load and warm up the models (in the background, so that /livez answers meanwhile),
        on this worker's GPU where there are GPUs."""
        from bentoml._internal.context import server_context

        self.worker_index = server_context.worker_index
        self.gpu = devices.gpu_for_worker(self.worker_index, GPUS)
        options = RuntimeOptions.from_settings(settings)
        try:
            self.ensemble = Ensemble.load(_member_tags(settings), options.on_gpu(self.gpu.index) if self.gpu else options)
            self.warmed_sizes = self.ensemble.warm_up()
            self.batcher = AdaptiveBatcher(self._predict, max_batch_size=settings.max_batch_size,
                                           slots=settings.model_threads)
            self.cards = [member.card for member in self.ensemble.members]
            self.classes = list(self.ensemble.classes)
            self.layout = self.ensemble.layout
            tags = [card.tag for card in self.cards]
            self.model_name = tags[0] if len(tags) == 1 else f"{settings.voting}-vote({','.join(tags)})"
            self.top_k = min(settings.top_k, len(self.classes))
        except Exception as exc:
            self.load_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.exception("loading the models failed: /readyz and /livez answer 503")
            return
        self.ready = True
        gpu = f" (worker {self.worker_index}: GPU {self.gpu.index}, {self.gpu.id})" if self.gpu else ""
        logger.info("serving %s (%s) on %s%s", ", ".join(tags),
                    settings.voting if len(tags) > 1 else "single model",
                    ", ".join(sorted(set(self.ensemble.providers().values()))), gpu)
        if WORKER_PLAN is not None and self.worker_index in (None, 1):  # once, not per worker
            logger.info("%s", WORKER_PLAN.describe())

    async def __is_ready__(self) -> bool:
        return self.ready

    async def __is_alive__(self) -> bool:
        return self.load_error is None

    def _predict(self, rows: np.ndarray, slot: int) -> np.ndarray:
        """One model call (on the batcher's model thread ``slot``), timed for /metrics."""
        with metrics.Stopwatch() as watch:
            probs = self.ensemble.predict(rows, slot)
        self.metrics.observe_model_call(len(rows), watch.seconds)
        return probs

    def _open(self, upload: Upload, name: str) -> Image.Image:
        return open_image(_read(upload), max_bytes=self.settings.max_bytes, max_pixels=self.settings.max_pixels,
                          name=name)

    def _prepare(self, files: list[Upload], names: list[str], first: Image.Image | None = None) -> np.ndarray:
        """Decode and preprocess uploads -> (N, width) rows for the batcher, one image at a
        time, so that a batch never holds more than one decoded image. ``first``: the first
        upload, already opened."""
        rows = np.empty((len(files), self.layout.width), dtype=np.float32)
        for index, (upload, name) in enumerate(zip(files, names)):
            image = first if index == 0 and first is not None else self._open(upload, name)
            self.layout.fill(rows[index], decode_opened(image, name))
        return rows

    async def _rows(self, files: list[Upload], names: list[str]) -> np.ndarray:
        """A small single image is decoded right here, anything else in a worker thread so that
        it does not hold up the event loop (for a small image the thread hop costs more than
        the decoding: about a third of the service's CPU per request on the digits model).
        "Small" counts the pixels the resize produces too (a 1 x 300,000 image is small to
        decode but is resized to 32 x 9,600,000 by a naive preprocessing)."""
        watch = metrics.Stopwatch()
        try:
            with watch:
                first = self._open(files[0], names[0]) if len(files) == 1 else None
                if first is not None and self.layout.work(*first.size) <= INLINE_DECODE_PIXELS:
                    return self._prepare(files, names, first)
                return await anyio.to_thread.run_sync(self._prepare, files, names, first,
                                                      limiter=self.decode_limiter)
        finally:
            self.metrics.decode_seconds.observe(watch.seconds)

    def _prediction(self, probs: np.ndarray) -> dict[str, Any]:
        return prediction(probs, self.classes, voting=self.settings.voting, top_k=self.top_k, model=self.model_name)

    async def _classify(self, files: list[Upload], names: list[str], *, batch: bool) -> JSONResponse:
        """The answer to /classify (``batch=False``: one image) or /classify_batch."""
        if not self.ready:
            return _not_ready(self.load_error)
        try:
            rows = await self._rows(files, names)
        except BadInput as exc:
            return _bad_input(exc)
        probs = await self.batcher(rows)
        return _answer([self._prediction(p) for p in probs] if batch else self._prediction(probs[0]))

    async def classify_direct(self, files: list[UploadFile]) -> JSONResponse:
        """/classify from the guard's parsed upload (see ``serve/guard.py``), headers as BentoML sends them."""
        return _bentoml_headers(await self._classify(files, ["image"], batch=False))

    async def classify_batch_direct(self, files: list[UploadFile]) -> JSONResponse:
        """/classify_batch from the guard's parsed uploads."""
        names = [f"images[{index}]" for index in range(len(files))]
        return _bentoml_headers(await self._classify(files, names, batch=True))

    @bentoml.api(route="/classify")
    async def classify(self, image: Path) -> dict[str, Any]:
        """Classify one image: ``{"label", "class_index", "confidence", "top_k", "model"[, "votes"]}``."""
        # BentoML sends a Response as is
        return await self._classify([image], ["image"], batch=False)  # type: ignore[return-value]

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path]) -> list[dict[str, Any]]:
        """Classify several images (repeated field ``images``): one answer per image, in order.
        ``UploadGuard`` has already refused more than ``SERVE_MAX_FILES`` of them (413)."""
        names = [f"images[{index}]" for index in range(len(images))]
        return await self._classify(list(images), names, batch=True)  # type: ignore[return-value]

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict[str, Any]:
        """Models (with accuracy, MACs, parameters, latency), classes, voting, providers, limits,
        and this worker's batching so far."""
        import onnxruntime as ort

        if not self.ready:
            return _not_ready(self.load_error)  # type: ignore[return-value]
        return {
            "model": self.model_name,
            "models": [card.summary() for card in self.cards],
            "classes": self.classes,
            "voting": self.settings.voting if len(self.cards) > 1 else None,
            "providers": self.ensemble.providers(),
            "precisions": self.ensemble.precisions(),
            "runtime": {**self.ensemble.runtime(), "warmed_batch_sizes": self.warmed_sizes},
            "onnxruntime": ort.__version__,
            "input_sizes": sorted({card.preprocessing.input_size for card in self.cards}),
            "limits": {"max_bytes": self.settings.max_bytes, "max_pixels": self.settings.max_pixels,
                       "max_files": self.settings.max_files, "max_batch_bytes": self.settings.max_batch_bytes,
                       "max_batch_size": self.settings.max_batch_size, "body_timeout_s": self.settings.body_timeout,
                       "body_idle_timeout_s": self.settings.body_idle_timeout},
            "batching": self.batcher.stats(),
            # this worker's GPU (None: no GPU; "providers" says whether CUDA really runs), and every worker's
            "worker": {"index": self.worker_index, "pid": os.getpid(), "gpu": self.gpu.to_dict() if self.gpu else None},
            "workers": devices.worker_devices(WORKERS, GPUS),
        }


# Declared as class attributes (before BentoML wraps the class) so that `bentoml build` packs
# the models into the Bento.
for _index, _tag in enumerate(TAGS):
    setattr(Classifier, f"model_{_index}", bentoml.models.BentoModel(_tag))

Classifier = bentoml.service(name="Classifier", workers=WORKERS, envs=ENVS,  # type: ignore[misc]
                             traffic={"timeout": TRAFFIC_TIMEOUT}, logging={"access": {"enabled": SETTINGS.access_log}})(Classifier)

Classifier.add_asgi_middleware(
    UploadGuard,
    rules={"/classify": UploadRule("image", 1, SETTINGS.max_bytes + MULTIPART_FRAMING),
           "/classify_batch": UploadRule("images", SETTINGS.max_files, SETTINGS.max_batch_bytes)},
    max_file_bytes=SETTINGS.max_bytes,
    budget=BodyBudget(SETTINGS.body_timeout, SETTINGS.body_idle_timeout),
    json_apis=("/metadata",),
    openapi=lambda: openapi.build(Classifier.openapi_spec.asdict(), max_files=SETTINGS.max_files),
    on_reject=metrics.count_rejection,
    direct=_direct_handler,
    answer_timeout=TRAFFIC_TIMEOUT,
)

__all__ = ["Classifier", "ConfigError"]

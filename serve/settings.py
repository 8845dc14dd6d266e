"""The service's configuration, read from the environment when the service starts.

Everything is an environment variable so that the same code runs under ``bentoml serve``,
in a built Bento and in its container (``docker run -e SERVE_MODELS=...``):

- ``SERVE_MODELS``: comma-separated model tags (``name:version`` or ``name`` for the latest);
  one tag serves that model, several a voting ensemble.
- ``SERVE_VOTING``: ``soft`` (mean of the members' probabilities, default) or ``hard``
  (majority of their labels, ties broken by mean probability).
- ``SERVE_PROVIDER``: ``auto`` (CUDA first, CPU fallback; default), ``cuda`` or ``cpu``.
- ``SERVE_RUNTIME``: ``onnxruntime`` (default) or ``openvino``: OpenVINO's CPU plugin on the same
  ONNX files (fp32, fp16 and QDQ int8; not ONNX Runtime's QOperator int8), where it is faster for the
  model at the service's batch sizes (the run's report says: "Against the alternatives"). CPU only;
  refused at start-up when OpenVINO is not installed or with ``SERVE_PROVIDER=cuda``.
- ``SERVE_PRECISION``: ``fp32`` (default), ``fp16`` or ``int8``: that variant of every member, where
  registered (``compress run --precisions`` / ``compress quantize``).
- ``SERVE_THREADS``: intra-op threads on CPU, ONNX Runtime's or OpenVINO's (default: the runtime's choice).
- ``SERVE_MAX_BYTES``: largest accepted image upload in bytes (default 20 MiB) -> 413.
- ``SERVE_MAX_PIXELS``: largest accepted image in pixels (default 40 M; decompression bombs) -> 400.
- ``SERVE_MAX_FILES``: most images in one ``/classify_batch`` request (default 64) -> 413.
- ``SERVE_MAX_BATCH_BYTES``: largest ``/classify_batch`` request body (default 64 MiB) -> 413
  (a ``/classify`` body may be ``SERVE_MAX_BYTES`` plus 64 KiB of multipart framing).
- ``SERVE_BODY_TIMEOUT``: seconds a whole request body may take to arrive (default 30) -> 408.
- ``SERVE_BODY_IDLE_TIMEOUT``: longest pause, in seconds, while a body arrives (default 5) -> 408.
- ``SERVE_TOP_K``: entries in ``top_k`` (default 5, at most the number of classes).
- ``SERVE_MAX_BATCH_SIZE``: most rows in one model call of the adaptive batcher (default 64).
- ``SERVE_WORKERS``: worker processes, each with its own sessions and batcher: a number;
  ``auto``: one per core, capped by memory (the rule is in ``serve/workers.py``); ``per-gpu``
  (the default): one per visible GPU when there are several and the models may run on CUDA,
  else 1. On a host with GPUs, worker i serves GPU (i - 1) mod N (``serve/devices.py``).
- ``SERVE_MODEL_THREADS``: model calls one worker runs at the same time (default 1): on a GPU,
  a second call can copy its batch while the first computes.
- ``SERVE_SESSIONS``: ``shared`` (default: one ONNX Runtime session per model, used by every
  model thread) or ``per-thread`` (a session per model thread: on CUDA its own stream).
- ``SERVE_BATCH_SHAPES``: ``auto`` (default: ``buckets`` on CUDA, ``exact`` on CPU), ``buckets``
  (batches padded to 1, 2, 4, ... ``SERVE_MAX_BATCH_SIZE`` rows; device buffers and IO binding
  made once per size) or ``exact`` (every size as it comes, all of them warmed up at start).
- ``SERVE_CUDNN_ALGO_SEARCH``: cuDNN convolution algorithm search on CUDA, ``heuristic``
  (default), ``exhaustive`` or ``default`` (see the README for what was measured).
- ``SERVE_CUDNN_MAX_WORKSPACE``: ``on`` (ONNX Runtime's default) or ``off``: whether cuDNN may
  use its largest workspace to pick faster convolution algorithms.
- ``SERVE_ACCESS_LOG``: ``off`` (default) or ``on``: one log line per request of the HTTP front
  (measured here: the line costs about a fifth of the CPU throughput; /metrics counts requests anyway).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

VOTING = ("soft", "hard")
PROVIDERS = ("auto", "cuda", "cpu")
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
SESSIONS = ("shared", "per-thread")
BATCH_SHAPES = ("auto", "buckets", "exact")
CUDNN_ALGO_SEARCH = ("heuristic", "exhaustive", "default")
SWITCH = ("on", "off", "1", "0", "true", "false")
AUTO = 0
"""``workers`` when ``SERVE_WORKERS=auto``: resolved once the models are known (``serve/workers.py``)."""
PER_GPU = -1
"""``workers`` when ``SERVE_WORKERS=per-gpu`` or unset: resolved from the visible GPUs (``serve/devices.py``)."""
WORKER_WORDS = {"auto": AUTO, "per-gpu": PER_GPU}


class ConfigError(RuntimeError):
    """The service cannot start with this configuration; the message says what to change."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"{name}={value:g} must be over 0 and at most 3600 seconds")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in SWITCH:
        raise ConfigError(f"{name}={raw!r} must be on or off")
    return raw in ("on", "1", "true")


def _workers(env: Mapping[str, str]) -> int:
    word = env.get("SERVE_WORKERS", "").strip().lower() or "per-gpu"
    if word in WORKER_WORDS:
        return WORKER_WORDS[word]
    if not word.replace("_", "").isdigit():
        raise ConfigError(f"SERVE_WORKERS={word!r} must be a number of workers, auto or per-gpu")
    return _int(env, "SERVE_WORKERS", 1)


def _runtime(env: Mapping[str, str], provider: str) -> str:
    """``SERVE_RUNTIME``, refused here (at start-up, before any worker) when it cannot run."""
    runtime = _choice(env, "SERVE_RUNTIME", RUNTIMES)
    if runtime == "openvino":
        if provider == "cuda":
            raise ConfigError("SERVE_RUNTIME=openvino runs the models on the CPU, but SERVE_PROVIDER=cuda asks for "
                              "the GPU; set SERVE_PROVIDER=cpu (or auto), or SERVE_RUNTIME=onnxruntime")
        from compress.runtime.openvino_models import openvino_unavailable_reason

        reason = openvino_unavailable_reason()
        if reason:
            raise ConfigError(f"SERVE_RUNTIME=openvino but {reason}; or unset SERVE_RUNTIME to serve on ONNX Runtime")
    return runtime


def parse_models(text: str) -> tuple[str, ...]:
    """``"a:1, b"`` -> ``("a:1", "b")``; a tag listed twice is an error (it would vote twice)."""
    tags = tuple(part.strip() for part in text.split(",") if part.strip())
    seen: set[str] = set()
    for tag in tags:
        if tag in seen:
            raise ConfigError(f"SERVE_MODELS lists {tag!r} twice")
        seen.add(tag)
    return tags


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    voting: str = "soft"
    provider: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    runtime: str = "onnxruntime"
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 64
    max_batch_bytes: int = 64 * 1024 * 1024
    body_timeout: float = 30.0
    body_idle_timeout: float = 5.0
    top_k: int = 5
    max_batch_size: int = 64
    workers: int = PER_GPU
    model_threads: int = 1
    sessions: str = "shared"
    batch_shapes: str = "auto"
    cudnn_algo_search: str = "heuristic"
    cudnn_max_workspace: bool = True
    access_log: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            models=parse_models(env.get("SERVE_MODELS", "")),
            voting=_choice(env, "SERVE_VOTING", VOTING),
            provider=_choice(env, "SERVE_PROVIDER", PROVIDERS),
            precision=_choice(env, "SERVE_PRECISION", PRECISIONS),
            threads=_int(env, "SERVE_THREADS", 0, minimum=0),
            runtime=_runtime(env, _choice(env, "SERVE_PROVIDER", PROVIDERS)),
            max_bytes=_int(env, "SERVE_MAX_BYTES", cls.max_bytes),
            max_pixels=_int(env, "SERVE_MAX_PIXELS", cls.max_pixels),
            max_files=_int(env, "SERVE_MAX_FILES", cls.max_files),
            max_batch_bytes=_int(env, "SERVE_MAX_BATCH_BYTES", cls.max_batch_bytes),
            body_timeout=_seconds(env, "SERVE_BODY_TIMEOUT", cls.body_timeout),
            body_idle_timeout=_seconds(env, "SERVE_BODY_IDLE_TIMEOUT", cls.body_idle_timeout),
            top_k=_int(env, "SERVE_TOP_K", cls.top_k),
            max_batch_size=_int(env, "SERVE_MAX_BATCH_SIZE", cls.max_batch_size),
            workers=_workers(env),
            model_threads=_int(env, "SERVE_MODEL_THREADS", cls.model_threads),
            sessions=_choice(env, "SERVE_SESSIONS", SESSIONS),
            batch_shapes=_choice(env, "SERVE_BATCH_SHAPES", BATCH_SHAPES),
            cudnn_algo_search=_choice(env, "SERVE_CUDNN_ALGO_SEARCH", CUDNN_ALGO_SEARCH),
            cudnn_max_workspace=_switch(env, "SERVE_CUDNN_MAX_WORKSPACE", default=True),
            access_log=_switch(env, "SERVE_ACCESS_LOG", default=False),
        )

    def cuda_options(self) -> dict[str, str]:
        """ONNX Runtime CUDA provider options from the cuDNN settings."""
        return {"cudnn_conv_algo_search": self.cudnn_algo_search.upper(),
                "cudnn_conv_use_max_workspace": "1" if self.cudnn_max_workspace else "0"}

    def require_models(self) -> tuple[str, ...]:
        if not self.models:
            raise ConfigError("SERVE_MODELS is not set: set it to a model tag printed by `compress register RUN_DIR` "
                              "(or several comma-separated tags for a voting ensemble); `bentoml models list` shows "
                              "the tags in the store")
        return self.models

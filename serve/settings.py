"""The service's configuration, read from the environment when the service starts.

Everything is an environment variable so that the same code runs under ``bentoml serve``,
in a built Bento and in its container (``docker run -e SERVE_MODELS=...``):

- ``SERVE_MODELS``: comma-separated model tags (``name:version`` or ``name`` for the latest);
  one tag serves that model, several a voting ensemble.
- ``SERVE_VOTING``: ``soft`` (mean of the members' probabilities, default) or ``hard``
  (majority of their labels, ties broken by mean probability).
- ``SERVE_PROVIDER``: ``auto`` (CUDA first, CPU fallback; default), ``cuda`` or ``cpu``.
- ``SERVE_PRECISION``: ``fp32`` (default), ``fp16`` or ``int8``: that variant of every member, where
  registered (``compress run --precisions`` / ``compress quantize``).
- ``SERVE_THREADS``: ONNX Runtime intra-op threads on CPU (default: ORT's choice).
- ``SERVE_MAX_BYTES``: largest accepted image upload in bytes (default 20 MiB) -> 413.
- ``SERVE_MAX_PIXELS``: largest accepted image in pixels (default 40 M; decompression bombs) -> 400.
- ``SERVE_MAX_FILES``: most images in one ``/classify_batch`` request (default 64) -> 413.
- ``SERVE_MAX_BATCH_BYTES``: largest ``/classify_batch`` request body (default 64 MiB) -> 413
  (a ``/classify`` body may be ``SERVE_MAX_BYTES`` plus 64 KiB of multipart framing).
- ``SERVE_BODY_TIMEOUT``: seconds a whole request body may take to arrive (default 30) -> 408.
- ``SERVE_BODY_IDLE_TIMEOUT``: longest pause, in seconds, while a body arrives (default 5) -> 408.
- ``SERVE_TOP_K``: entries in ``top_k`` (default 5, at most the number of classes).
- ``SERVE_MAX_BATCH_SIZE``: most rows in one model call of the adaptive batcher (default 64).
- ``SERVE_WORKERS``: worker processes (default 1), each with its own sessions and batcher;
  ``auto``: one per core, capped by memory (the rule is in ``serve/workers.py``).
- ``SERVE_ACCESS_LOG``: ``off`` (default) or ``on``: one log line per request of the HTTP front
  (measured here: the line costs about a fifth of the CPU throughput; /metrics counts requests anyway).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

VOTING = ("soft", "hard")
PROVIDERS = ("auto", "cuda", "cpu")
PRECISIONS = ("fp32", "fp16", "int8")
AUTO = 0
"""``workers`` when ``SERVE_WORKERS=auto``: resolved once the models are known (``serve/workers.py``)."""


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
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 64
    max_batch_bytes: int = 64 * 1024 * 1024
    body_timeout: float = 30.0
    body_idle_timeout: float = 5.0
    top_k: int = 5
    max_batch_size: int = 64
    workers: int = 1
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
            max_bytes=_int(env, "SERVE_MAX_BYTES", cls.max_bytes),
            max_pixels=_int(env, "SERVE_MAX_PIXELS", cls.max_pixels),
            max_files=_int(env, "SERVE_MAX_FILES", cls.max_files),
            max_batch_bytes=_int(env, "SERVE_MAX_BATCH_BYTES", cls.max_batch_bytes),
            body_timeout=_seconds(env, "SERVE_BODY_TIMEOUT", cls.body_timeout),
            body_idle_timeout=_seconds(env, "SERVE_BODY_IDLE_TIMEOUT", cls.body_idle_timeout),
            top_k=_int(env, "SERVE_TOP_K", cls.top_k),
            max_batch_size=_int(env, "SERVE_MAX_BATCH_SIZE", cls.max_batch_size),
            workers=AUTO if env.get("SERVE_WORKERS", "").strip().lower() == "auto"
            else _int(env, "SERVE_WORKERS", cls.workers),
            access_log=_choice(env, "SERVE_ACCESS_LOG", ("off", "on", "0", "1", "false", "true")) in ("on", "1", "true"),
        )

    def require_models(self) -> tuple[str, ...]:
        if not self.models:
            raise ConfigError("SERVE_MODELS is not set: set it to a model tag printed by `compress register RUN_DIR` "
                              "(or several comma-separated tags for a voting ensemble); `bentoml models list` shows "
                              "the tags in the store")
        return self.models

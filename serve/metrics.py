"""What the service adds to BentoML's ``/metrics``, and two repairs to BentoML's own metrics.

Added (prometheus_client in BentoML's multiprocess mode, so every worker's figures are summed):

- ``serve_batch_size``: rows per model call of the adaptive batcher (histogram);
- ``serve_model_seconds``: time of one model call, all ensemble members (histogram);
- ``serve_decode_seconds``: decoding and preprocessing the images of one request (histogram);
- ``serve_rejected_requests_total{reason}``: requests answered with a 4xx/503/504, by reason, from
  the fixed list :data:`REASONS` (a label value never comes from the request).

Repairs (BentoML 1.4.39, measured):

- BentoML labels its request metrics with the raw URL path, so every unknown path became a
  series of its own (2,000 GETs to random paths grew ``/metrics`` from 9 KB to 7.8 MB and the
  worker by 160 MB). :func:`bound_endpoint_labels` makes its metrics middleware label a path
  outside the service's routes ``other``.
- ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts and all
  services on one ``BENTOML_HOME`` share it, so a second service wiped the first one's figures
  and each then reported the sum of both. :func:`use_private_multiproc_dir` gives each
  ``bentoml serve`` process a folder of its own, removed when it exits.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

REASONS = (
    "body_too_large", "body_timeout", "unsupported_media_type", "malformed_body", "missing_field",
    "too_many_files", "bad_filename", "empty_image", "image_too_large", "too_many_pixels", "not_an_image",
    "damaged_image", "not_found", "method_not_allowed", "not_ready", "answer_timeout",
)
"""Every value the ``reason`` label can take."""

OTHER_ENDPOINT = "other"
"""The ``endpoint`` label of a request to a path the service does not serve."""


class ServiceMetrics:
    """The service's own metrics; created in the worker (after BentoML has set
    ``PROMETHEUS_MULTIPROC_DIR``), once per process (see :func:`service_metrics`)."""

    def __init__(self, max_batch_size: int) -> None:
        from prometheus_client import Counter, Histogram

        batch_buckets = sorted({2 ** i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        # registry=None: in multiprocess mode the values go to the shared folder whatever the
        # registry, and BentoML's /metrics reads that folder.
        self.batch_size = Histogram("serve_batch_size", "Rows per model call of the adaptive batcher",
                                    buckets=batch_buckets, registry=None)
        self.model_seconds = Histogram("serve_model_seconds", "Duration of one model call (all ensemble members)",
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                       registry=None)
        self.decode_seconds = Histogram("serve_decode_seconds", "Decoding and preprocessing the images of a request",
                                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                        registry=None)
        self.rejected = Counter("serve_rejected_requests", "Requests refused (4xx, 503 while loading, 504 too slow), by reason",
                                ["reason"], registry=None)
        self._rejected = {reason: self.rejected.labels(reason=reason) for reason in REASONS}
        for child in self._rejected.values():  # every reason shows from the start (at 0)
            child.inc(0)

    def observe_model_call(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.model_seconds.observe(seconds)

    def reject(self, reason: str) -> None:
        self._rejected[reason if reason in self._rejected else "malformed_body"].inc()


_METRICS: ServiceMetrics | None = None


def service_metrics(max_batch_size: int = 64) -> ServiceMetrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = ServiceMetrics(max_batch_size)
    return _METRICS


def count_rejection(reason: str) -> None:
    """For the HTTP guard: count a refused request (creates the metrics on first use)."""
    service_metrics().reject(reason)


class Stopwatch:
    """``with Stopwatch() as watch: ...; watch.seconds``."""

    seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: Any) -> None:
        self.seconds = time.perf_counter() - self._start


def use_private_multiproc_dir(service_name: str) -> str:
    """Point this ``bentoml serve`` process (and so its workers) at a Prometheus multiprocess
    folder of its own; call it before BentoML starts the server. Returns the folder."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    folder = tempfile.mkdtemp(prefix=f"bentoml-metrics-{service_name}-")
    BentoMLContainer.prometheus_multiproc_dir.set(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def bound_endpoint_labels(routes: Iterable[str], prefixes: Iterable[str] = ("/static_content/", "/assets/")) -> None:
    """Make BentoML's HTTP metrics middleware label requests to paths outside ``routes`` (and
    outside the static ``prefixes``, labelled by prefix) ``other``. Call before the ASGI app
    is built (the service module is imported first, in every worker)."""
    from bentoml._internal.server.http import instruments

    original = getattr(instruments.RunnerTrafficMetricsMiddleware, "_serve_original", None) \
        or instruments.RunnerTrafficMetricsMiddleware
    known = frozenset(routes)
    prefixes = tuple(prefixes)

    def label(path: str) -> str:
        if path in known:
            return path
        for prefix in prefixes:
            if path.startswith(prefix):
                return prefix.rstrip("/")
        return OTHER_ENDPOINT

    class BoundedTrafficMetrics(original):  # type: ignore[valid-type,misc]
        """BentoML's middleware, seeing a bounded path; the app behind it sees the real one."""

        _serve_original = original

        def __init__(self, app: Any, **options: Any) -> None:
            async def restore_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
                real = scope.get("serve.path")
                await app(scope if real is None else {**scope, "path": real}, receive, send)

            super().__init__(restore_path, **options)

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = scope.get("path")
            if path is not None and path not in known:
                scope = {**scope, "path": label(path), "serve.path": path}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetrics

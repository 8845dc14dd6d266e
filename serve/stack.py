"""Where the upload guard sits in BentoML's middleware stack.

BentoML 1.4.39 builds each worker's ASGI app as: HTTP metrics -> OpenTelemetry -> traffic
timeout -> the service's own middleware (``serve/guard.py``) -> request context -> routes.
The guard answers the upload endpoints itself, and for those answers the three layers between
the metrics and the guard only cost CPU: without a tracing exporter nothing is traced, the
guard bounds the body's time itself and runs the answer under the same traffic timeout
(``UploadGuard(answer_timeout=...)``), and the direct handlers read no request context.
Measured in-process on the digits model (one ``/classify`` at a time, 32x32 JPEG): about
0.2 ms of CPU per request, a sixth of what the service spends outside the model.

:func:`guard_after_metrics` puts the guard right behind the metrics middleware, so that
``/metrics`` still counts every request, while no tracing exporter is configured; with one
(``tracing.exporter_type``), the order stays BentoML's and the upload endpoints are traced."""
from __future__ import annotations

from typing import Any


def reorder(stack: list[Any], guard: type, metrics: type | None, *, traced: bool) -> list[Any]:
    """``stack`` (Starlette ``Middleware`` entries, outermost first) with ``guard`` moved to
    just behind ``metrics`` (to the front without it); unchanged when ``traced``."""
    guards = [entry for entry in stack if entry.cls is guard]
    if traced or not guards:
        return stack
    rest = [entry for entry in stack if entry.cls is not guard]
    at = next((index + 1 for index, entry in enumerate(rest)
               if metrics is not None and isinstance(entry.cls, type) and issubclass(entry.cls, metrics)), 0)
    return rest[:at] + guards + rest[at:]


def _tracing_exported() -> bool:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return bool(BentoMLContainer.config.tracing.exporter_type.get())


def guard_after_metrics(guard: type) -> None:
    """Make BentoML's app factory place ``guard`` behind its HTTP metrics middleware (see the
    module docstring). Call before the ASGI app is built (the service module is imported
    first, in every worker); calling it again replaces the earlier choice."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.server.http import instruments

    original = getattr(ServiceAppFactory, "_serve_original_middlewares", ServiceAppFactory.middlewares)

    def middlewares(self: Any) -> list[Any]:
        metrics = instruments.RunnerTrafficMetricsMiddleware
        metrics = getattr(metrics, "_serve_original", metrics)  # serve/metrics.py's subclass counts too
        return reorder(original.fget(self), guard, metrics, traced=_tracing_exported())

    ServiceAppFactory._serve_original_middlewares = original  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign,assignment]

"""Tracing only when it goes somewhere.

BentoML wraps every request in OpenTelemetry's ASGI middleware, whether or not tracing is
configured: without an exporter (the default, ``tracing.exporter_type`` unset) each request
still builds a server span, its attributes and wrapped ``receive``/``send`` channels that
nobody collects (measured in-process: 0.3 of the 0.4 ms of CPU of a ``GET /livez``, and about
a fifth of a ``/classify`` request with a 32x32 JPEG once BentoML's API wrapper is out of the
way). :func:`skip_unexported_spans` makes BentoML's ``tracing.excluded_urls`` list cover every
request in that case only; with an exporter configured
(``BENTOML_CONFIG_OPTIONS='tracing.exporter_type=otlp ...'``) every request is traced as
before. The ``X-BentoML-Request-ID`` header, which BentoML takes from the span, is then a
random id of the same form (see :func:`request_id`)."""
from __future__ import annotations

import random
from typing import Any


class UntracedRequests:
    """What OpenTelemetry's middleware asks (``url_disabled``) of BentoML's exclusion list:
    every URL while no exporter is configured, else the configured exclusions. Decided on the
    first request, once BentoML has loaded the service's final configuration."""

    def __init__(self) -> None:
        self._resolved: Any = None

    def resolve(self) -> Any:
        """``True`` (skip everything) without an exporter, else the configured exclusions."""
        from bentoml._internal.configuration.containers import BentoMLContainer
        from opentelemetry.util.http import ExcludeList

        tracing = BentoMLContainer.config.tracing
        if not tracing.exporter_type.get():
            return True
        configured = tracing.excluded_urls.get()
        patterns = [p.strip() for p in configured.split(",")] if isinstance(configured, str) else list(configured or [])
        return ExcludeList([p for p in patterns if p])

    def url_disabled(self, url: str) -> bool:
        if self._resolved is None:
            self._resolved = self.resolve()
        return self._resolved is True or self._resolved.url_disabled(url)


def skip_unexported_spans() -> UntracedRequests:
    """Give BentoML's OpenTelemetry middleware an :class:`UntracedRequests` as its exclusion
    list; call before the ASGI app is built (the service module is imported first, in every
    worker)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    exclusions = UntracedRequests()
    BentoMLContainer.tracing_excluded_urls.set(exclusions)
    return exclusions


def request_id() -> str:
    """The request's ``X-BentoML-Request-ID``: the span id while a span is open (as BentoML
    sends it), else a random 64-bit id in the same format."""
    from bentoml._internal.context import trace_context

    span_id = trace_context.request_id
    return format(span_id if span_id is not None else random.getrandbits(64), "016x")

"""The router's request spans: W3C trace context always (no SDK), OpenTelemetry spans when an OTLP endpoint is set.

:class:`ContextTracer` (``trace_context`` on, no ``otlp_endpoint``): each request's span is a child of the client's
``traceparent`` (or a new trace), known by its IDs only — a header parse and 8 random bytes per request, nothing
imported. :class:`OtelTracer` (``otlp_endpoint`` set): the same span is recorded by the OpenTelemetry SDK (a SERVER
span named after the route, with the response status) and exported over OTLP/HTTP in batches off the request path;
its IDs are the ones passed on in ``traceparent``. The SDK and the exporter (both in the ``[router]`` extra) are
imported only then, so a router without spans pays neither their import (benchmarks/extras_benchmark.py) nor their
CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from rollout.settings import RouterSettings
from service.common.tracing import TraceContext, child_span, parse_traceparent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

SERVICE_NAME: Final[str] = "fraudwatch-router"
_HEX_TRACE: Final[str] = "032x"
_HEX_SPAN: Final[str] = "016x"
_SERVER_ERROR: Final[int] = 500


class RequestSpan(Protocol):
    """One request's span: its IDs (None when the router does not trace) and its end."""

    @property
    def context(self) -> TraceContext | None: ...

    def end(self, status: int) -> None: ...


class RequestTracer(Protocol):
    def start(self, traceparent: str | None, name: str) -> RequestSpan: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class IdsOnly:
    """A span known by its IDs only: nothing to record at its end."""

    context: TraceContext | None

    def end(self, status: int) -> None:
        return None


_UNTRACED: Final[IdsOnly] = IdsOnly(None)


class NoTracer:
    """``trace_context`` off: no span, no ``traceparent`` to the model services."""

    def start(self, traceparent: str | None, name: str) -> RequestSpan:
        return _UNTRACED

    def shutdown(self) -> None:
        return None


class ContextTracer:
    """W3C trace context without an SDK."""

    def start(self, traceparent: str | None, name: str) -> RequestSpan:
        return IdsOnly(child_span(parse_traceparent(traceparent)))

    def shutdown(self) -> None:
        return None


@dataclass(slots=True)
class SdkSpan:
    """A span the OpenTelemetry SDK records; ``span`` is an ``opentelemetry.trace.Span``."""

    context: TraceContext
    span: Any

    def end(self, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("http.response.status_code", status)
        if status >= _SERVER_ERROR:
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


def _remote_parent(caller: TraceContext | None) -> Any:
    """The client's span as an OpenTelemetry parent context (None: a new trace)."""
    if caller is None:
        return None
    from opentelemetry import trace

    span_context = trace.SpanContext(
        trace_id=int(caller.trace_id, 16),
        span_id=int(caller.span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(caller.flags, 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


class OtelTracer:
    """OpenTelemetry SDK spans exported over OTLP/HTTP to ``otlp_endpoint`` (a BatchSpanProcessor: the request path
    only records; export runs on the SDK's thread)."""

    def __init__(self, endpoint: str, provider: TracerProvider | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if provider is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._provider = provider
        self._tracer = provider.get_tracer("rollout.router")

    def start(self, traceparent: str | None, name: str) -> RequestSpan:
        from opentelemetry.trace import SpanKind

        caller = parse_traceparent(traceparent)
        span = self._tracer.start_span(name, context=_remote_parent(caller), kind=SpanKind.SERVER)
        ids = span.get_span_context()
        context = TraceContext(
            trace_id=format(ids.trace_id, _HEX_TRACE),
            span_id=format(ids.span_id, _HEX_SPAN),
            flags=format(int(ids.trace_flags), "02x"),
            parent_id=caller.span_id if caller is not None else None,
        )
        return SdkSpan(context, span)

    def shutdown(self) -> None:
        """Export what is buffered (called when the router stops)."""
        self._provider.shutdown()


def tracer_of(settings: RouterSettings) -> RequestTracer:
    """The tracer ``settings`` ask for: none, W3C context only (default), or OpenTelemetry spans over OTLP."""
    if not settings.trace_context:
        return NoTracer()
    if settings.otlp_endpoint is not None:
        return OtelTracer(settings.otlp_endpoint)
    return ContextTracer()

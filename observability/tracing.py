"""Tracing with OpenTelemetry: one trace per request across every role it touches.

The frontend opens a SERVER span for the request (a child of the client's W3C `traceparent` when one is
sent), CLIENT spans for its prefill and decode calls, and the request router a `route` span; the context
travels to the workers inside the request (`WorkerRequest.trace_context`, a W3C carrier), where the
prefill and decode workers open SERVER spans with `queue` (arrival to first scheduled step) and
`kv_transfer` children. Attributes follow the GenAI semantic conventions (`gen_ai.request.model`,
`gen_ai.usage.input_tokens`, ...).

Off by default: spans are recorded only once `configure()` found an exporter — OTLP over HTTP when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER=otlp) is set,
configured by the standard OTEL_* variables — or was given one (tests). OTEL_SDK_DISABLED=true wins.
"""

import os
import threading
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["SpanKind", "Status", "StatusCode", "configure", "enabled", "extract", "inject", "tracer"]

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider = None


def _wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_TRACES_EXPORTER", "").lower() == "otlp"
    )


def configure(service_name: str, exporter=None) -> bool:
    """Install this process's tracer provider once: `exporter` (tests: synchronous), else OTLP/HTTP from the
    OTEL_* environment (batched). Returns whether spans are recorded."""
    global _provider
    with _lock:
        if _provider is not None:
            return True
        if exporter is None and not _wanted():
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        processor: SpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
        else:
            processor = SimpleSpanProcessor(exporter)
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        _provider = TracerProvider(resource=resource)
        _provider.add_span_processor(processor)
        trace.set_tracer_provider(_provider)
        return True


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    return trace.get_tracer("ridgeline")


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The context a W3C carrier (HTTP headers, or a request's trace_context) names; empty when none."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def inject(span: trace.Span) -> dict[str, str]:
    """A W3C carrier making `span` the parent of whatever receives it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def flush(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)

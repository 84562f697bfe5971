"""OpenTelemetry tracing: off unless the standard OTEL_* variables turn it on.

`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set turns it on;
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off. The SDK reads the
rest itself: `OTEL_SERVICE_NAME` (default here: scanner-gateway), `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default here: parentbased_traceidratio
at 0.1: a caller's decision is followed, a tenth of the rest traced),
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_PROTOCOL` (http/protobuf here; grpc
needs the grpc exporter installed). Spans carry no photo bytes, keys or URLs (hosts only).

Code opens spans on `TRACER`, OpenTelemetry's proxy: a no-op until `start_tracing` sets
the process's provider. The HTTP layer does no tracing work at all while it is off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scanner_gateway import __version__

TRACER = trace.get_tracer("scanner_gateway", __version__)
W3C = TraceContextTextMapPropagator()  # traceparent / tracestate, in and out
DEFAULT_SERVICE_NAME = "scanner-gateway"


def server_attributes(url: str) -> dict[str, str | int]:
    """`server.address` (the host) and `server.port` of a URL, as the semantic conventions
    name them: never the path or query (a signed URL's query is a credential)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return {"server.address": parts.hostname or "", **({"server.port": port} if port else {})}


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def start_tracing(environ: Mapping[str, str] = os.environ) -> object | None:
    """The process's tracer provider, exporting over OTLP, when the environment asks for
    one; None when it does not, or when this process has one already (several apps in
    one process share it). Call `shutdown()` on what it returns to flush at exit."""
    if not tracing_requested(environ):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    resource = Resource.create({SERVICE_VERSION: __version__})  # reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, sampler=_default_sampler(environ))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


DEFAULT_SAMPLE_RATIO = 0.1  # every request traced cost the relay ~0.27 ms of CPU (bench/results/tracing-overhead-*)


def _default_sampler(environ: Mapping[str, str]) -> object | None:
    """None (the SDK reads OTEL_TRACES_SAMPLER) when the variable is set; else a parent-based
    ratio sampler at OTEL_TRACES_SAMPLER_ARG, DEFAULT_SAMPLE_RATIO without it."""
    if environ.get("OTEL_TRACES_SAMPLER"):
        return None
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", DEFAULT_SAMPLE_RATIO))
    except ValueError:
        ratio = DEFAULT_SAMPLE_RATIO
    return ParentBased(TraceIdRatioBased(min(max(ratio, 0.0), 1.0)))


def inject_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) for the current span, when there is one: the
    engine's own spans then join the request's trace."""
    if trace.get_current_span().get_span_context().is_valid:
        W3C.inject(headers)


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None outside a trace."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None

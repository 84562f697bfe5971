"""Per-request id, access log line and request metrics (pure ASGI, outermost layer).

`X-Request-Id` from the client is kept when it is sane (else a new one is made); it
comes back on the response, appears in every log line of the request and is forwarded
to vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner_gateway.api.errors import error_response
from scanner_gateway.api.paths import RELAYED_PATHS, SCAN_PATH
from scanner_gateway.context import request_id
from scanner_gateway.errors import Draining, log_if_server_side
from scanner_gateway.metrics import GatewayMetrics
from scanner_gateway.tracing import TRACER, W3C

TRACE_ID_HEADER = b"x-trace-id"
_TRACE_HEADERS = (b"traceparent", b"tracestate")

log = logging.getLogger("scanner_gateway.access")
MAX_REQUEST_ID = 128
CUT_AT_SHUTDOWN = "the gateway shut down before this request finished; retry it"
# Requests that never reach a FastAPI route: the raw relay, and scans a middleware
# answered first (401, 413, a key's 429), which should count as scans, not "unmatched".
_UNROUTED = {path: path for path in (*RELAYED_PATHS, SCAN_PATH)}


# New ids: a random per-process prefix and a counter (unique without a syscall each).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def accept_request_id(presented: bytes | None) -> str:
    if presented:
        value = presented.decode("latin-1")
        if len(value) <= MAX_REQUEST_ID and value.isprintable() and value.strip() == value:
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _server_span(scope: Scope) -> Any:
    """The request's server span, continuing the caller's `traceparent` if it sent one."""
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
               if name in _TRACE_HEADERS}
    return TRACER.start_span(
        f"{scope['method']} {scope['path']}", context=W3C.extract(carrier), kind=SpanKind.SERVER,
        attributes={"http.request.method": scope["method"], "url.path": scope["path"],
                    "url.scheme": scope.get("scheme", "http"), "network.protocol.version": scope.get("http_version", "")},
    )


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, access_log: bool, tracing: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.tracing = tracing  # off: no tracing work on any request
        # Labelled children, looked up once per (route, method, status): labels() is not free.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                presented = value
        rid = accept_request_id(presented)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # if the app dies before answering, uvicorn answers 500
        response_started = False
        span = trace_id = span_token = None
        added = [(b"x-request-id", rid.encode("latin-1"))]
        if self.tracing:
            span = _server_span(scope)
            span_token = otel_context.attach(trace.set_span_in_context(span))
            if span.get_span_context().is_valid:
                trace_id = trace.format_trace_id(span.get_span_context().trace_id)
                added.append((TRACE_ID_HEADER, trace_id.encode()))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Only the server cancels a request (a client that leaves ends its own with a
            # 499 or a quiet return): uvicorn's graceful shutdown ran out of time. Say so
            # with a retryable 503 rather than uvicorn's bare 500 and traceback.
            status = Draining.status
            if response_started:
                raise  # mid-answer: only closing the connection can tell the client
            err = log_if_server_side(Draining(CUT_AT_SHUTDOWN, headers={"Retry-After": "1"}))
            await error_response(err)(scope, receive, send_with_id)
            this_request = asyncio.current_task()
            if this_request is not None:
                this_request.uncancel()  # answered: the cancellation has been dealt with
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or _UNROUTED.get(scope["path"], "unmatched")
            key = (template, scope["method"], status)
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    self.metrics.requests.labels(template, scope["method"], str(status)),
                    self.metrics.request_seconds.labels(template),
                )
            children[0].inc()
            children[1].observe(elapsed)
            if self.access_log:
                entry = {
                    "method": scope["method"], "path": scope["path"], "route": template, "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": scope["client"][0] if scope.get("client") else None,
                }
                if trace_id is not None:
                    entry["trace_id"] = trace_id
                log.info("request", extra=entry)
            if span is not None:
                span.update_name(f"{scope['method']} {template}")
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                span.end()
                otel_context.detach(span_token)
            request_id.reset(token)

"""Per-request context shared across layers without threading it through every call."""

from __future__ import annotations

from contextvars import ContextVar

# Set by the request middleware for each request; read by logs and the engine client
# (which forwards it to vLLM as X-Request-Id).
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

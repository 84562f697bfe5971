"""Request intake limits (pure ASGI middleware): the body size cap and deadline, enforced
while the body streams in, no compressed bodies, and requests open per API key."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner_gateway.api.auth import BATCH_CALLER_SCOPE_KEY, client_scope
from scanner_gateway.api.errors import error_response
from scanner_gateway.errors import (
    BodyTimeout,
    KeyOverLimit,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMedia,
)
from scanner_gateway.metrics import GatewayMetrics


class BodySizeLimit:
    """413 before reading when Content-Length is too big; otherwise stop at the cap.

    Chunked uploads without a length are counted as they arrive, so no request can make
    the gateway buffer more than `max_bytes`. The whole body must arrive within
    `timeout_s` of the app's first read (408): uvicorn has no such limit, and a client
    trickling a byte now and then would hold its connection and buffer for ever.

    All requests together hold at most `max_buffered_bytes` of body until they end (429
    `overloaded` beyond, before reading when the length is declared): each alone is
    capped, but a burst of large uploads from slow shop uplinks is not, and would take
    the process past its memory limit. (Conservative: a body counts until its answer is
    sent, though a scan lets go of it earlier.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, max_buffered_bytes: int,
                 uploads: Mapping[str, tuple[int, float]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_buffered_bytes = max(max_buffered_bytes, max_bytes)  # one largest request always fits
        self.buffered = 0
        # path -> (max bytes, timeout): file uploads, larger and slower, spooled to disk as
        # they arrive (so not counted among the buffered bytes).
        self.uploads = dict(uploads or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, timeout_s = self.uploads.get(scope["path"], (self.max_bytes, self.timeout_s))
        counted = scope["path"] not in self.uploads
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            length = int(declared)
            if length > max_bytes:
                await error_response(self._error(max_bytes)).__call__(scope, receive, send)
                return
            if counted and self.buffered + length > self.max_buffered_bytes:
                await error_response(self._busy()).__call__(scope, receive, send)
                return
        encoding = headers.get(b"content-encoding")  # absent on nearly every request: no work then
        if encoding is not None and encoding.strip().lower() != b"identity":
            # Read as-is, a compressed body would fail later as "invalid JSON" or reach
            # vLLM, which does not decompress either: say what is wrong instead.
            err = UnsupportedMedia(
                f"request bodies are read uncompressed; Content-Encoding "
                f"{encoding.decode('latin-1').strip()!r} is not accepted "
                "(photos are compressed already)",
                param="content-encoding",
            )
            await error_response(err)(scope, receive, send)
            return
        received = 0
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_done
            if body_done:  # later reads wait for a disconnect, as long as the answer takes
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {timeout_s:g} s ({received} bytes came)",
                    param="body",
                    headers={"Connection": "close"},  # the rest of the body is never read
                ) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if received + size > max_bytes:
                    raise self._error(max_bytes)
                if counted and self.buffered + size > self.max_buffered_bytes:
                    raise self._busy(headers={"Connection": "close"})  # the rest is never read
                received += size
                self.buffered += size if counted else 0
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.buffered -= received if counted else 0

    def _error(self, max_bytes: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {max_bytes} bytes", param="body")

    def _busy(self, headers: dict[str, str] | None = None) -> Overloaded:
        return Overloaded(
            f"the gateway holds {self.buffered} bytes of request bodies already (its limit is "
            f"{self.max_buffered_bytes}); retry shortly", retry_after_s=1, headers=headers,
        )


class KeyConcurrencyLimit:
    """At most `max_in_flight` requests open per API key on the `limited_paths` (the ones
    that reach an engine), counted from arrival to the last byte of the answer, queueing
    included. One store's runaway client then gets 429 `key_over_limit` while the others
    are still admitted; without it, it could fill the shared admission queue alone.
    Installed inside the key check, so only valid keys are counted."""

    def __init__(
        self, app: ASGIApp, max_in_flight: int, limited_paths: Collection[str], metrics: GatewayMetrics
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.limited_paths = frozenset(limited_paths)
        self.metrics = metrics
        self.open: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.limited_paths:
            await self.app(scope, receive, send)
            return
        # A batch item counts against the key that created its batch (the same tag).
        key = scope.get(BATCH_CALLER_SCOPE_KEY) or client_scope(
            dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
        if self.open[key] >= self.max_in_flight:
            self.metrics.client_limit_rejections.inc()
            err = KeyOverLimit(f"this API key already has {self.max_in_flight} requests open; retry shortly")
            await error_response(err)(scope, receive, send)
            return
        self.open[key] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open[key] -= 1
            if not self.open[key]:
                del self.open[key]  # bounded by the keys with requests open

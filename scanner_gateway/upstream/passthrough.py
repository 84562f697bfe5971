"""Relay an OpenAI request to vLLM byte for byte, at raw-ASGI cost.

The body is forwarded as received (vLLM-specific fields such as structured_outputs,
mm_processor_kwargs and priority pass untouched, nothing is parsed or re-serialised) and
the answer, streamed or not, is relayed chunk by chunk as it arrives, never buffered.

`ChatPassthrough` takes `POST /v1/chat/completions`, `POST /v1/completions` (what
load tools such as `vllm bench serve` use) and `POST /v1/responses` before FastAPI sees
them: FastAPI's request cycle (routing, dependency solving, StreamingResponse's task
group) cost more CPU than the whole relay. Chat and Responses bodies that may name a
`scan/<task>` model go on to the FastAPI route, which runs the scan (or, if the mention
was elsewhere, relays after all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner_gateway.admission import (
    PRIORITY_HEADER,
    AdmissionController,
    PriorityClass,
    parse_priority,
)
from scanner_gateway.errors import GatewayError, error_response, log_if_server_side
from scanner_gateway.upstream.pool import ReplicaPool
from scanner_gateway.upstream.relay_media import (
    MEDIA_MARK_FIRST_BYTES,
    RelayMedia,
    opens_media_mark,
    unusual_encoding,
)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"  # the OpenAI SDKs' `client.responses.create`, which vLLM serves
RELAYED_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH})
SCAN_MODEL_PATHS = frozenset({CHAT_PATH, RESPONSES_PATH})  # where a `scan/<task>` model is served
# Hop-by-hop headers are the proxy's business, not the engine's; so is CORS (vLLM allows
# every origin by default; the gateway's own policy is SCANNER_CORS_ORIGINS).
_DROP = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"server", b"date"})
_DROP_PREFIX = b"access-control-"
_PRIORITY_HEADER = PRIORITY_HEADER.encode()
_JSON_SPACE = (b" ", b"\t", b"\r", b"\n")
# How a scan model's name can start in JSON (PHP escapes "/" by default).
_SCAN_MODEL_STARTS = (b"scan/", b"scan\\/")


NAMES_SCAN_MODEL, MAY_CARRY_MEDIA = 1, 2
# What a string's first byte may open, indexed by the byte: the loop below looks up one
# int per string instead of comparing prefixes for each.
_OPENS = tuple(
    NAMES_SCAN_MODEL if byte == _SCAN_MODEL_STARTS[0][0] else MAY_CARRY_MEDIA if byte in MEDIA_MARK_FIRST_BYTES else 0
    for byte in range(256)
)


def body_marks(body: bytes) -> int:
    """Cheap pre-check, no parse: which of NAMES_SCAN_MODEL and MAY_CARRY_MEDIA the body
    may deserve; a mark left out means the body surely does not.

    Visits only the string openings (and closings): a quote is found with memchr, and a
    100 KB base64 image holds none, so this costs ~8 us where `b'"scan/' in body` cost
    ~80 us. One pass for both marks: a second one would cost as much again.
    """
    marks = MAY_CARRY_MEDIA if unusual_encoding(body) else 0
    quote = body.find(b'"')
    last = len(body) - 1
    while quote != -1 and quote < last:
        start = quote + 1
        opens = _OPENS[body[start]]
        if opens == NAMES_SCAN_MODEL:
            if body.startswith(_SCAN_MODEL_STARTS, start):
                marks |= NAMES_SCAN_MODEL
        elif opens and opens_media_mark(body, start):
            marks |= MAY_CARRY_MEDIA
        quote = body.find(b'"', start)
    return marks


def may_name_scan_model(body: bytes) -> bool:
    return bool(body_marks(body) & NAMES_SCAN_MODEL)


def with_priority(body: bytes, priority: int) -> bytes:
    """`body` with `"priority": N` as its first member, no parse, one copy.

    JSON parsers (vLLM's included) keep the last of duplicate keys, so a client's own
    `priority` later in the body still wins. Bodies that are not objects pass unchanged.
    """
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        return body
    first = 1
    while stripped[first:first + 1] in _JSON_SPACE:
        first += 1
    separator = b"" if stripped[first:first + 1] == b"}" else b","
    return b"".join((b'{"priority":%d%s' % (priority, separator), memoryview(stripped)[1:]))


class ChatRelay:
    """Relays (chat) completion requests to the pool, under admission control and
    priorities, their media held to the gateway's URL policy (`relay_media.py`)."""

    def __init__(
        self,
        pool: ReplicaPool,
        admission: AdmissionController,
        default_priority: PriorityClass,
        engine_priorities: Mapping[PriorityClass, int] | None,
        media: RelayMedia,
    ) -> None:
        self.pool = pool
        self.admission = admission
        self.default_priority = default_priority
        self.engine_priorities = engine_priorities
        self.media = media

    async def __call__(
        self,
        body: bytes,
        content_type: str,
        priority_header: str | None,
        receive: Receive,
        send: Send,
        path: str = CHAT_PATH,
        carries_media: bool | None = None,
    ) -> None:
        """`carries_media`: the body's MAY_CARRY_MEDIA mark, where the caller has it."""
        try:
            klass = parse_priority(priority_header, self.default_priority)
            if carries_media is None:
                carries_media = bool(body_marks(body) & MAY_CARRY_MEDIA)
            if carries_media:
                self.admission.check(klass)  # an overloaded gateway refuses before downloading
                body = await self.media.vetted(body)
            async with self.admission.slot(klass):
                if self.engine_priorities is not None:
                    body = with_priority(body, self.engine_priorities[klass])
                await relay(self.pool, path, body, content_type, receive, send)
        except GatewayError as err:  # refused before anything was sent
            await error_response(log_if_server_side(err))(_http_scope(), receive, send)


async def relay(
    pool: ReplicaPool, path: str, body: bytes, content_type: str, receive: Receive, send: Send
) -> None:
    """Forward `body` to a replica and relay its answer to the ASGI `send`.

    A client that goes away cancels the relay; leaving `pool.stream` then closes the
    engine connection, which is how vLLM learns to abort the request. Errors before the
    answer started are raised (GatewayError); after that the response just ends early.
    """
    relay_task = asyncio.current_task()
    assert relay_task is not None
    client_gone = False

    async def watch_disconnect() -> None:
        nonlocal client_gone
        while (await receive())["type"] != "http.disconnect":
            pass
        client_gone = True
        relay_task.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    started = False
    try:
        async with pool.stream(path, body, content_type) as (client, response):
            headers = []
            for name, value in response.raw_headers:
                name = name.lower()
                if name not in _DROP and not name.startswith(_DROP_PREFIX):
                    headers.append((name, value))
            if response.content_type == "text/event-stream":
                headers.append((b"x-accel-buffering", b"no"))  # nginx-style proxies: do not buffer SSE
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            started = True
            async for chunk in client.relay(response):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except asyncio.CancelledError:
        if not client_gone:
            raise
        relay_task.uncancel()  # we cancelled ourselves on purpose: the client left
        return
    except GatewayError:
        if not started:
            raise
        return  # mid-body: all we can do is end the response early
    finally:
        watcher.cancel()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _http_scope() -> Scope:
    # Starlette responses only read the scope's type and extensions.
    return {"type": "http", "extensions": {}}


class PassthroughResponse(Response):
    """A response that relays a request to the engine (for use from a route)."""

    def __init__(self, chat_relay: ChatRelay, body: bytes, headers: Headers, path: str) -> None:
        # Starlette's Response.__init__ would render a body; this one relays instead.
        self.args = (chat_relay, body, headers.get("content-type", ""), headers.get(PRIORITY_HEADER), path)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chat_relay, body, content_type, priority, path = self.args
        await chat_relay(body, content_type, priority, receive, send, path)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client left before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that hands out an already-read body once, then defers to the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class ChatPassthrough:
    """Pure-ASGI fast path for `POST /v1/chat/completions` (to an engine model),
    `POST /v1/completions` and `POST /v1/responses`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in RELAYED_PATHS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except GatewayError as err:  # e.g. the body-size cap, raised while reading
            await error_response(err)(scope, receive, send)
            return
        if body is None:
            return
        path = scope["path"]
        marks = body_marks(body)
        if marks & NAMES_SCAN_MODEL and path in SCAN_MODEL_PATHS:
            await self.app(scope, replay(body, receive), send)
            return
        content_type, priority = "", None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == _PRIORITY_HEADER:
                priority = value.decode("latin-1")
        await scope["app"].state.chat_relay(
            body, content_type, priority, receive, send, path, carries_media=bool(marks & MAY_CARRY_MEDIA)
        )

"""The relay's one door: OpenAI requests to vLLM, byte for byte, at raw-ASGI cost.

The body is forwarded as received (vLLM-specific fields such as structured_outputs,
mm_processor_kwargs and priority pass untouched, nothing is parsed or re-serialised) and
the answer, streamed or not, is relayed chunk by chunk as it arrives, never buffered.

`RelayDoor` takes `POST /v1/chat/completions`, `POST /v1/completions` (what load tools
such as `vllm bench serve` use) and `POST /v1/responses` before FastAPI sees them:
FastAPI's request cycle (routing, dependency solving, StreamingResponse's task group)
cost more CPU than the whole relay. A chat or Responses body whose `model` is a
`scan/<task>` (looked for without a parse first, `relay_body.body_marks`) goes on to the
FastAPI route, which runs the scan; every other request is relayed here, and only here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner_gateway.admission import (
    PRIORITY_HEADER,
    AdmissionController,
    PriorityClass,
    parse_priority,
)
from scanner_gateway.api.errors import error_response
from scanner_gateway.api.paths import CHAT_PATH, RELAYED_PATHS, SCAN_MODEL_PATHS
from scanner_gateway.api.state import gateway_state
from scanner_gateway.errors import GatewayError, log_if_server_side
from scanner_gateway.scan.scan_models import scan_task_name
from scanner_gateway.upstream.pool import ReplicaPool
from scanner_gateway.upstream.relay_body import (
    MAY_CARRY_MEDIA,
    NAMES_SCAN_MODEL,
    body_marks,
    with_priority,
)
from scanner_gateway.upstream.relay_media import RelayMedia

# Hop-by-hop headers are the proxy's business, not the engine's; so is CORS (vLLM allows
# every origin by default; the gateway's own policy is SCANNER_CORS_ORIGINS).
_DROP = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"server", b"date"})
_DROP_PREFIX = b"access-control-"
_PRIORITY_HEADER = PRIORITY_HEADER.encode()


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


def names_scan_model(body: bytes) -> bool:
    """The body's `model` is a `scan/<task>`. Parsed only when the cheap pre-check says
    it may be (a string starting `scan/` somewhere in it)."""
    if not body_marks(body) & NAMES_SCAN_MODEL:
        return False
    try:
        fields = json.loads(body)
    except ValueError:
        return False
    model = fields.get("model") if isinstance(fields, dict) else None
    return isinstance(model, str) and scan_task_name(model) is not None


class RelayDoor:
    """Pure-ASGI door of `POST /v1/chat/completions` and `/v1/responses` (engine models)
    and `POST /v1/completions`: the one place a relayed request enters."""

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
        if marks & NAMES_SCAN_MODEL and path in SCAN_MODEL_PATHS and names_scan_model(body):
            await self.app(scope, replay(body, receive), send)  # a scan: the FastAPI route
            return
        content_type, priority = "", None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == _PRIORITY_HEADER:
                priority = value.decode("latin-1")
        await gateway_state(scope["app"]).chat_relay(
            body, content_type, priority, receive, send, path, carries_media=bool(marks & MAY_CARRY_MEDIA)
        )

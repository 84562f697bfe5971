"""The batch worker's requests, sent through the gateway's own ASGI app in-process: a
batch line meets the same routes, checks, media policy, admission and error rendering as
the request sent over HTTP, without a socket (and without a key: the batch's key was
checked when it was created)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message

from scanner_gateway.admission import PRIORITY_HEADER
from scanner_gateway.api.auth import BATCH_CALLER_SCOPE_KEY
from scanner_gateway.api.paths import SCAN_PATH
from scanner_gateway.batches.input_lines import BatchRequest
from scanner_gateway.batches.runner import Answer

BATCH_CLASS = "batch"


def batch_body(request: BatchRequest) -> bytes:
    """The line's body at the batch class: a scan's `priority` field says batch, and an
    engine `priority` of its own is dropped (the gateway sets the batch class's)."""
    body = dict(request.body)
    if request.url == SCAN_PATH:
        body["priority"] = BATCH_CLASS
    else:
        body.pop("priority", None)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class AsgiDispatch:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s  # beyond the request's own deadline: a hung app must not hold the item

    async def __call__(self, owner: str, request: BatchRequest) -> Answer:
        body = batch_body(request)
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": request.url, "raw_path": request.url.encode(),
            "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (PRIORITY_HEADER.encode(), BATCH_CLASS.encode()), (b"host", b"batch-worker")],
            "client": ("batch-worker", 0), "server": ("batch-worker", 0), "state": {},
            BATCH_CALLER_SCOPE_KEY: owner,
        }
        answered = asyncio.Event()
        sent_body = False
        status = 500
        headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()  # the "client" stays until the answer is complete
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in message["headers"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, send)
        finally:
            answered.set()
        return Answer(status, headers.get("x-request-id"), _json_text(b"".join(chunks)),
                      _retry_after(headers.get("retry-after")))


def _json_text(raw: bytes) -> str:
    """The answer as JSON text to store (an answer that is not JSON, stored as a string)."""
    text = raw.decode("utf-8", "replace")
    try:
        json.loads(text)
    except ValueError:
        return json.dumps(text)
    return text


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None

"""Relay a request to vLLM byte for byte: the body is forwarded as received (vLLM-specific
fields such as structured_outputs, mm_processor_kwargs and priority pass untouched), and
the answer, streamed or not, is relayed chunk by chunk as it arrives, never buffered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from scanner_gateway.upstream.client import EngineClient

# Hop-by-hop and length headers are the proxy's business, not the engine's.
_DROP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"})


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


async def forward(engine: EngineClient, path: str, body: bytes, content_type: str) -> StreamingResponse:
    response = await engine.open_stream(
        "POST", path, content=body, headers={"content-type": content_type or "application/json"}
    )
    headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROP}
    if "text/event-stream" in response.headers.get("content-type", ""):
        headers["x-accel-buffering"] = "no"  # tell nginx-style proxies not to buffer SSE
    # Closing the upstream response when we are done (or when the client goes away and
    # Starlette cancels the relay) closes the connection, which aborts the request in vLLM.
    return StreamingResponse(
        _relay(response),
        status_code=response.status_code,
        headers=headers,
        background=BackgroundTask(response.aclose),
    )

"""Streamed answers of scan models (`stream: true` with `model: "scan/<task>"`).

A scan takes seconds, and its result is one JSON document, so there is nothing to stream
until it ends. Sending nothing for that long breaks streaming clients that expect the
first chunk about as soon as vLLM would send one (a read timeout, a proxy's idle timeout,
a UI waiting for the first event). So the scan gets `FIRST_BYTE_WAIT_S` to end: if it
does (or fails: a full queue's 429, a bad photo's 4xx, all fast), the answer is as usual,
errors with their HTTP status; if not, the stream opens with its first events, an SSE
comment keeps it alive every `KEEPALIVE_S`, and the result's events end it, or, should
the scan fail after all, an error event (as vLLM and OpenAI end a stream that fails once
it has begun). The client leaving cancels the scan, in the stream as before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import StreamingResponse

from scanner_gateway.api.disconnect import cancel_on_disconnect
from scanner_gateway.errors import ClientClosedRequest, GatewayError, log_if_server_side
from scanner_gateway.scan.results import ScanResult

log = logging.getLogger(__name__)

FIRST_BYTE_WAIT_S = 0.5
KEEPALIVE_S = 5.0
SSE_KEEPALIVE = b": scan running\n\n"  # an SSE comment: every client skips it


class ScanEventStream(Protocol):
    def opening(self) -> bytes: ...
    def events(self, result: ScanResult) -> Iterator[bytes]: ...
    def failure(self, err: GatewayError) -> Iterator[bytes]: ...


async def stream_scan(
    request: Request,
    scan: Coroutine[Any, Any, ScanResult],
    stream: ScanEventStream,
) -> StreamingResponse:
    task = asyncio.ensure_future(cancel_on_disconnect(request, scan))
    try:
        done, _ = await asyncio.wait({task}, timeout=FIRST_BYTE_WAIT_S)
    except asyncio.CancelledError:  # the request itself is cancelled (the server is stopping)
        task.cancel()
        raise
    if done:
        result = task.result()  # a failure raises here: the handler answers its status
        return _sse(_at_once(stream, result))
    return _sse(_while_scanning(task, stream))


def _sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    # no-transform and X-Accel-Buffering: proxies must pass the early events on, not hold them.
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"cache-control": "no-cache, no-transform", "x-accel-buffering": "no"})


async def _at_once(stream: ScanEventStream, result: ScanResult) -> AsyncIterator[bytes]:
    yield stream.opening()
    for event in stream.events(result):
        yield event


async def _while_scanning(task: asyncio.Future[ScanResult], stream: ScanEventStream) -> AsyncIterator[bytes]:
    try:
        yield stream.opening()
        while True:
            done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_S)
            if done:
                break
            yield SSE_KEEPALIVE
        try:
            result = task.result()
        except ClientClosedRequest:
            return  # nobody is left to read the rest
        except GatewayError as err:
            for event in stream.failure(log_if_server_side(err)):
                yield event
            return
        except Exception:
            log.exception("scan failed after its stream had opened")
            for event in stream.failure(GatewayError("internal error; see gateway logs")):
                yield event
            return
        for event in stream.events(result):
            yield event
    finally:
        task.cancel()  # the stream was closed early (the client left): stop the scan too

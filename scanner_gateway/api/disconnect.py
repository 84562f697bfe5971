"""Stop work whose client has gone: a scan nobody waits for must not keep the engine busy."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from scanner_gateway.errors import ClientClosedRequest

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (which closes the engine
    connection, so vLLM aborts the generation) and raise ClientClosedRequest, an ordinary
    error for the handler, rather than letting the cancellation escape the request (which
    uvicorn reports as a crash of the app). Call after the body has been read."""
    task = asyncio.ensure_future(work)
    client_gone = False

    async def watch() -> None:
        nonlocal client_gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        client_gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        this_request = asyncio.current_task()
        if client_gone and this_request is not None and not this_request.cancelling():
            raise ClientClosedRequest("the client closed the connection before the answer") from None
        raise  # the request itself is being cancelled (the server is stopping)
    finally:
        watcher.cancel()

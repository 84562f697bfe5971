"""A drain period on SIGTERM, in every process that serves the app.

On SIGTERM (an orchestrator stopping the pod) the app first reports not-ready on /ready
for `drain_s` while still serving, so load balancers stop sending it traffic; only then
does the server's own SIGTERM handler run (uvicorn: stop accepting, finish in-flight
requests up to its graceful timeout, exit). A second SIGTERM, or SIGINT, stops at once.

It wraps whatever SIGTERM handler the server installed before the app's startup, rather
than subclassing the server, so it works the same under `--workers N`, where uvicorn's
supervisor builds each worker's server itself and forwards SIGTERM to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def drain_on_sigterm(state: Any, drain_s: float) -> Iterator[None]:
    """While open (the app's lifetime), defer the server's SIGTERM handler by `drain_s`
    and set `state.draining` meanwhile. A no-op off the main thread (tests' in-process
    clients) or where nothing handles SIGTERM."""
    stop = signal.getsignal(signal.SIGTERM)
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread() or not callable(stop):
        yield
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if getattr(state, "draining", False) or loop.is_closed():
            stop(sig, frame)  # a second SIGTERM: no more waiting
            return
        state.draining = True

        def begin() -> None:  # on the loop: no logging from inside a signal handler
            log.info("SIGTERM: reporting not-ready for %.1f s while serving, then shutting down", drain_s)
            loop.call_later(drain_s, stop, sig, None)

        loop.call_soon_threadsafe(begin)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, stop)

"""drain_on_sigterm: the server's SIGTERM handler runs only after the drain period."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from types import SimpleNamespace

from scanner_gateway.drain import drain_on_sigterm


def test_sigterm_drains_first_and_a_second_one_stops_at_once():
    stops: list[float] = []

    async def scenario() -> SimpleNamespace:
        loop = asyncio.get_running_loop()
        state = SimpleNamespace()
        with drain_on_sigterm(state, 0.3):
            start = loop.time()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.1)
            assert state.draining is True and stops == []  # still serving, not ready
            await asyncio.sleep(0.35)
            assert len(stops) == 1 and stops[0] - start >= 0.3  # then the server stops
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.01)
            assert len(stops) == 2  # no second drain period
        return state

    def server_stop(sig, frame):
        stops.append(asyncio.get_event_loop().time())

    previous = signal.signal(signal.SIGTERM, server_stop)
    try:
        asyncio.run(scenario())
        assert signal.getsignal(signal.SIGTERM) is server_stop  # the server's own handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_no_drain_period_or_other_thread_leaves_the_handler_alone():
    def server_stop(sig, frame):
        pass

    async def check(drain_s: float) -> bool:
        with drain_on_sigterm(SimpleNamespace(), drain_s):
            return signal.getsignal(signal.SIGTERM) is server_stop

    previous = signal.signal(signal.SIGTERM, server_stop)
    try:
        assert asyncio.run(check(0))
        untouched: list[bool] = []
        elsewhere = threading.Thread(target=lambda: untouched.append(asyncio.run(check(5.0))))  # TestClient's thread
        elsewhere.start()
        elsewhere.join()
        assert untouched == [True]
    finally:
        signal.signal(signal.SIGTERM, previous)

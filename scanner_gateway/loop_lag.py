"""Event-loop lag: how late a timer fires on the gateway's event loop.

Everything in a gateway process waits for its one loop: a loop that is blocked (CPU
starved, or something synchronous where it should not be) delays every request, and an
engine connection that was made in time is only noticed when the loop turns again, so
it may count as a connect timeout. The lag is exported as a histogram, and a stall long
enough to cause such errors is logged. `LoopStalls` remembers when the last one was, so
that the replica pool does not blame an engine for a timeout that our own standstill
caused (on a busy 2-CPU VM the whole machine stood still for 3-7 s at a time, measured).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LAG_PROBE_INTERVAL_S = 0.5
LAG_WARNING_S = 1.0


class LoopStalls:
    """When this process's event loop last stood still, fed by `watch_loop_lag`."""

    def __init__(self, *, interval_s: float = LAG_PROBE_INTERVAL_S, stall_s: float = LAG_WARNING_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.stall_s, self._clock = interval_s, stall_s, clock
        self._last_tick: float | None = None  # None: no watcher runs, so nothing is known
        self._last_stall = float("-inf")

    def observe(self, lag: float) -> None:
        self._last_tick = self._clock()
        if lag >= self.stall_s:
            self._last_stall = self._last_tick

    def stalled_since(self, started: float) -> bool:
        """Did the loop stand still at some point after `started` (on this clock)? Also
        true while the stall is still unobserved: the watcher's wake-up is overdue."""
        if self._last_tick is None:
            return False
        overdue = self._clock() - self._last_tick > self.interval_s + self.stall_s
        return overdue or self._last_stall >= started


async def watch_loop_lag(
    observe: Callable[[float], None],
    *,
    interval_s: float = LAG_PROBE_INTERVAL_S,
    warn_after_s: float = LAG_WARNING_S,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Sleep `interval_s` at a time and report how much later than asked each wake-up was."""
    while True:
        started = clock()
        await asyncio.sleep(interval_s)
        lag = max(0.0, clock() - started - interval_s)
        observe(lag)
        if lag >= warn_after_s:
            log.warning("the event loop ran %.2f s late (blocked, or the process starved of CPU): every "
                        "request in this process waited; engine connects that timed out meanwhile are "
                        "retried and not held against the engine", lag)

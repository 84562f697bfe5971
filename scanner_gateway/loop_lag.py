"""Event-loop lag: how late a timer fires on the gateway's event loop.

Everything in a gateway process waits for its one loop: a loop that is blocked (CPU
starved, or something synchronous where it should not be) delays every request, and an
engine connection that was made in time is only noticed when the loop turns again, so
it may count as a connect timeout. The lag is exported as a histogram, and a stall long
enough to cause such errors is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LAG_PROBE_INTERVAL_S = 0.5
LAG_WARNING_S = 1.0


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
                        "request in this process waited, and engine connects may have timed out", lag)

import asyncio
import logging
import re
import time

from scanner_gateway.loop_lag import watch_loop_lag


def test_a_blocked_loop_is_measured_and_a_long_stall_logged(caplog):
    lags: list[float] = []

    async def run() -> None:
        watcher = asyncio.create_task(watch_loop_lag(lags.append, interval_s=0.05, warn_after_s=0.3))
        await asyncio.sleep(0.2)  # a few quiet rounds
        time.sleep(0.4)  # something synchronous on the loop
        await asyncio.sleep(0.2)
        watcher.cancel()

    with caplog.at_level(logging.WARNING, logger="scanner_gateway.loop_lag"):
        asyncio.run(run())
    assert len(lags) >= 4
    # The 0.4 s block made one timer at least ~0.35 s late (no upper bound: a busy box adds to it).
    assert max(lags) >= 0.3, lags
    stalls = [r.getMessage() for r in caplog.records]
    assert any(re.search(r"ran \d+\.\d\d s late", m) for m in stalls), stalls

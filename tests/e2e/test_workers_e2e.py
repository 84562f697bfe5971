"""`scanner-gateway serve --workers 2` in front of the real engine: both workers serve,
/metrics adds them up, and SIGTERM drains while a scan still runs at the engine."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.engine_watch import (
    engine_full,
    finished,
    gateway_metric,
    sent_to_engine,
    wait_finished,
    wait_until,
)
from tests.helpers import gateway_process, shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(480, 360, seed=71)


def scan(url: str) -> httpx.Response:
    # A new connection each time: the kernel hands it to whichever worker accepts first.
    return httpx.post(f"{url}/v1/scan", files={"image": ("shelf.jpg", PHOTO, "image/jpeg")},
                      data={"task": "storefront"}, headers={"connection": "close"}, timeout=300)


def scan_pids(output: str) -> set[int]:
    """The workers (pid) whose access lines show a /v1/scan answered 200."""
    pids = set()
    for line in output.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("path") == "/v1/scan" and entry.get("status") == 200:
            pids.add(entry["pid"])
    return pids


def test_two_workers_serve_sum_their_metrics_and_drain(engine, tmp_path):
    # A drain period long enough to be seen through the stalls of seconds a busy 2-core box has.
    with gateway_process(engine.base_url, tmp_path / "gateway.log", workers=2, SCANNER_DRAIN_S="10") as gateway:
        sent = 0
        with ThreadPoolExecutor(4) as pool:
            while len(scan_pids(gateway.output())) < 2:
                assert sent < 64, "one worker took every connection"
                assert [r.status_code for r in pool.map(lambda _: scan(gateway.url), range(4))] == [200] * 4
                sent += 4
        assert gateway_metric(gateway.url, "scanner_scans_total", task="storefront", outcome="ok") == sent

        # SIGTERM while a scan waits inside the engine (its batch full): /ready turns 503
        # (load balancers move away), the scan is still answered, then the gateway exits.
        stopped = finished(engine.base_url, "stop")
        result: dict[str, httpx.Response] = {}
        late_scan = threading.Thread(target=lambda: result.update(r=scan(gateway.url)))
        with engine_full(engine.base_url):
            late_scan.start()
            wait_until(lambda: sent_to_engine(gateway.url), "the scan is at the engine")
            gateway.proc.send_signal(signal.SIGTERM)
            ready = wait_until(lambda: not_ready(gateway.url), "/ready says draining")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        late_scan.join(300)  # the engine's batch has room again: the scan runs
        assert result["r"].status_code == 200, result["r"].text
        assert gateway.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        wait_finished(engine.base_url, stopped, 1, reason="stop")


def not_ready(url: str) -> httpx.Response | None:
    try:
        r = httpx.get(f"{url}/ready", headers={"connection": "close"}, timeout=10)
    except httpx.TransportError:  # a worker that is already closing its listener: ask again
        return None
    return r if r.status_code != 200 else None

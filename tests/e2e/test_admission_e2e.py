"""Admission in front of the real engine: 429 with Retry-After, priorities, per-key caps.

One admission slot is held by a long relayed chat stream (tests/e2e/engine_watch.py), so
what happens to the next request depends on the gateway's rules, not on timing.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from tests.e2e.engine_watch import (
    HELD_MAX_TOKENS,
    engine_held,
    finished,
    gateway_metric,
    wait_finished,
    wait_until,
)
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(480, 360, seed=51)


def scan(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/scan", files={"image": ("shelf.jpg", PHOTO, "image/jpeg")},
                      data={"task": "storefront"}, headers=headers, timeout=300)


def test_a_full_gateway_answers_429_with_retry_after_and_the_engine_sees_nothing(gateway_with, engine):
    with gateway_with(max_in_flight_per_replica=1, queue_limit=0) as url:
        with engine_held(url, engine.base_url):
            before = finished(engine.base_url)
            refused = scan(url)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            assert finished(engine.base_url) == before
        assert scan(url).status_code == 200  # the slot is free again


def test_interactive_overtakes_queued_batch(gateway_with, engine):
    done: list[str] = []
    lock = threading.Lock()

    def scan_as(klass: str) -> str:
        r = scan(url, {"X-Priority": klass})
        with lock:
            done.append(klass)
        return f"{r.status_code} {r.text[:300]}"

    with gateway_with(max_in_flight_per_replica=1, max_queue_wait_s=600) as url, ThreadPoolExecutor(2) as pool:
        with engine_held(url, engine.base_url):
            batch = pool.submit(scan_as, "batch")
            wait_until(lambda: queued(url, "batch", batch), "the batch scan is queued")
            interactive = pool.submit(scan_as, "interactive")
            wait_until(lambda: queued(url, "interactive", interactive), "the interactive scan is queued too")
        # One slot: the interactive scan ran to its end before the batch scan could start.
        assert interactive.result().startswith("200 ") and batch.result().startswith("200 ")
        assert done == ["interactive", "batch"]


def queued(url: str, klass: str, scan_future: Future) -> bool:
    assert not scan_future.done(), f"the {klass} scan was answered instead of queued: {scan_future.result()}"
    return gateway_metric(url, "scanner_admission_queue_depth", priority=klass) == 1


def test_one_key_over_its_cap_gets_429_while_another_key_is_served(gateway_with, engine):
    keys = {"store-a": {"Authorization": "Bearer store-a"}, "store-b": {"Authorization": "Bearer store-b"}}
    with gateway_with(api_keys="store-a,store-b", max_in_flight_per_key=1) as url:
        with engine_held(url, engine.base_url, headers=keys["store-a"]):
            before = finished(engine.base_url)
            over = scan(url, keys["store-a"])
            assert over.status_code == 429 and over.json()["error"]["code"] == "key_over_limit"
            assert over.headers["retry-after"] == "1"
            other = scan(url, keys["store-b"])
            assert other.status_code == 200, other.text
            wait_finished(engine.base_url, before, 1, idle=False)  # store-b's scan only
            assert gateway_metric(url, "scanner_client_limit_rejections_total") == 1
        assert scan(url, keys["store-a"]).status_code == 200


def test_with_no_cap_a_saturated_engine_makes_scans_wait_in_the_gateway(gateway_with, engine):
    # Twelve long generations straight at the engine: it runs 8 (--max-num-seqs) and queues
    # 4, which its vllm:num_requests_waiting gauge reports: saturated, for the gateway.
    body = {"model": DEV_SERVED_NAME, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": HELD_MAX_TOKENS, "ignore_eos": True, "stream": True}
    with gateway_with(probe_interval_s=0.5) as url, ExitStack() as holds:
        client = holds.enter_context(httpx.Client(timeout=120))
        for _ in range(12):
            holds.enter_context(client.stream("POST", f"{engine.base_url}/v1/chat/completions", json=body))
        wait_until(lambda: gateway_metric(url, "scanner_replica_engine_waiting") >= 4, "the gateway saw the queue")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(scan, url)
            wait_until(lambda: queued(url, "interactive", waiting), "the scan waits in the gateway, not the engine")
            holds.close()  # the engine drains: the next gauge reading lets the scan in
            assert waiting.result(timeout=300).status_code == 200

"""Idempotency-Key against the real engine: what the README promises, counted at the engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.engine_watch import finished, wait_finished
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(480, 360, seed=41)
OTHER_PHOTO = shelf_jpeg(480, 360, seed=42)


def scan(url: str, key: str, photo: bytes = PHOTO, api_key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.post(f"{url}/v1/scan", files={"image": ("shelf.jpg", photo, "image/jpeg")},
                      data={"task": "storefront", "locale": "en"}, headers=headers, timeout=300)


def test_a_repeat_returns_the_first_result_and_a_reused_key_is_422(gateway_url, engine):
    before = finished(engine.base_url)
    first = scan(gateway_url, "till-7-photo-1")
    again = scan(gateway_url, "till-7-photo-1")
    assert first.status_code == again.status_code == 200, first.text
    assert again.json() == first.json()  # the same scan: id, result, timings
    wait_finished(engine.base_url, before, 1)

    reused = scan(gateway_url, "till-7-photo-1", photo=OTHER_PHOTO)
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert reused.json()["error"]["param"] == "Idempotency-Key"
    fresh = scan(gateway_url, "till-7-photo-2")
    assert fresh.status_code == 200 and fresh.json()["id"] != first.json()["id"]
    wait_finished(engine.base_url, before, 2)


def test_concurrent_repeats_join_one_engine_request(gateway_url, engine):
    before = finished(engine.base_url)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: scan(gateway_url, "flaky-uplink-retry"), range(4)))
    assert [r.status_code for r in answers] == [200] * 4
    assert len({r.json()["id"] for r in answers}) == 1
    wait_finished(engine.base_url, before, 1)


def test_keys_are_scoped_to_the_client_that_sent_them(gateway_with, engine):
    # Two stores that happen to pick the same Idempotency-Key get their own scans.
    with gateway_with(api_keys="store-a-key,store-b-key") as url:
        before = finished(engine.base_url)
        a = scan(url, "photo-1", api_key="store-a-key")
        b = scan(url, "photo-1", photo=OTHER_PHOTO, api_key="store-b-key")
        a_again = scan(url, "photo-1", api_key="store-a-key")
        assert a.status_code == b.status_code == a_again.status_code == 200, (a.text, b.text)
        assert b.json()["id"] != a.json()["id"] and a_again.json()["id"] == a.json()["id"]
        wait_finished(engine.base_url, before, 2)


def test_the_oldest_key_is_dropped_past_the_cap(gateway_with, engine):
    with gateway_with(idempotency_max_keys=1) as url:
        before = finished(engine.base_url)
        first = scan(url, "k1").json()["id"]
        second = scan(url, "k2").json()["id"]
        assert scan(url, "k2").json()["id"] == second  # the newest is kept
        assert scan(url, "k1").json()["id"] not in (first, second)  # k1 was dropped: scanned again
        wait_finished(engine.base_url, before, 3)


def test_a_key_expires_after_its_ttl(gateway_with, engine):
    with gateway_with(idempotency_ttl_s=1.0) as url:
        before = finished(engine.base_url)
        first = scan(url, "short-lived")
        time.sleep(1.5)  # past the TTL (no upper bound is asserted)
        again = scan(url, "short-lived")
        assert first.status_code == again.status_code == 200
        assert again.json()["id"] != first.json()["id"]
        wait_finished(engine.base_url, before, 2)

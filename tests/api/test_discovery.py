"""A gateway whose replicas are a DNS name's records (SCANNER_UPSTREAMS=dns+http://...),
looked up through a real DNS server on loopback (bench/dns_zone.py), with engines on
127.0.0.2-4 sharing one port, as pods behind a headless Service do.

FAKE ENGINES: three vLLM engines do not fit a 2-core box beside the session's, and the
test needs an answer it can hold (a request in flight on a replica that leaves)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.dns_zone import DnsZone
from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.fake_engine import FakeEngineServer, FakeReply, completion
from tests.helpers import serve_in_thread

NAME = "engines.test"
DEADLINE_S = 60
CHAT = {"model": "fake-engine-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engines() -> Iterator[dict[str, FakeEngineServer]]:
    first = FakeEngineServer(host="127.0.0.2").start()
    servers = {"127.0.0.2": first}
    for host in ("127.0.0.3", "127.0.0.4"):
        servers[host] = FakeEngineServer(host=host, port=first.port).start()
    yield servers
    for server in servers.values():
        server.stop()


def ready_replicas(url: str) -> dict[str, dict]:
    return {r["url"]: r for r in httpx.get(f"{url}/ready", timeout=10).json().get("replicas", [])}


def wait_until(probe, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (value := probe()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)
    return value


def chats(url: str, n: int) -> None:
    for _ in range(n):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200, r.text


def test_replicas_follow_the_name_and_one_that_leaves_finishes_its_requests(engines):
    port = engines["127.0.0.2"].port
    a, b, c = (f"http://127.0.0.{i}:{port}" for i in (2, 3, 4))
    zone = DnsZone()
    zone.set(NAME, ["127.0.0.2", "127.0.0.3"])
    with zone.serving() as dns:
        settings = Settings(upstreams=f"dns+http://{NAME}:{port}", dns_server=dns,
                            discovery_interval_s=0.2, probe_interval_s=0.2)
        with serve_in_thread(create_app(settings)) as url:
            assert ready_replicas(url).keys() == {a, b}
            chats(url, 6)
            assert all(engines[h].engine.payloads for h in ("127.0.0.2", "127.0.0.3"))

            # An answer held at each engine, then .2 leaves DNS while its request runs.
            release = threading.Event()
            for server in engines.values():
                server.engine.answer = lambda payload: FakeReply(**{**completion("held").__dict__, "until": release})
            answers: list[httpx.Response] = []
            held = [threading.Thread(target=lambda: answers.append(
                httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=90))) for _ in range(2)]
            for t in held:
                t.start()
            wait_until(lambda: all(r["in_flight"] == 1 for r in ready_replicas(url).values()), "one request at each")
            zone.set(NAME, ["127.0.0.3"])
            wait_until(lambda: ready_replicas(url)[a].get("leaving"), "the gateway saw .2 leave")
            for server in engines.values():
                server.engine.answer = None
            sent_to_a = len(engines["127.0.0.2"].engine.payloads)
            chats(url, 4)  # .3 answers them beside its held one
            assert len(engines["127.0.0.2"].engine.payloads) == sent_to_a  # nothing new to the leaving one
            assert a in ready_replicas(url)  # still there: its request runs
            release.set()
            for t in held:
                t.join(90)
            assert [r.status_code for r in answers] == [200, 200]  # its request finished there
            wait_until(lambda: a not in ready_replicas(url), ".2 dropped once idle")

            # A DNS server failing keeps the replicas found; a new record takes traffic.
            zone.set(NAME, None)
            wait_until(lambda: "scanner_discovery_failures_total" in failures(url), "the failed lookups counted")
            assert ready_replicas(url).keys() == {b}
            zone.set(NAME, ["127.0.0.3", "127.0.0.4"])
            wait_until(lambda: ready_replicas(url).get(c, {}).get("healthy"), ".4 joined")
            chats(url, 6)
            assert engines["127.0.0.4"].engine.payloads


def failures(url: str) -> str:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines() if line.startswith("scanner_discovery_failures_total{"))


def test_no_record_yet_is_not_ready_then_ready_when_one_appears(engines):
    port = engines["127.0.0.2"].port
    zone = DnsZone()
    with zone.serving() as dns:
        settings = Settings(upstreams=f"dns+http://{NAME}:{port}", dns_server=dns,
                            discovery_interval_s=0.2, probe_interval_s=0.2)
        with serve_in_thread(create_app(settings)) as url:
            r = httpx.get(f"{url}/ready", timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
            refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
            assert refused.status_code == 503, refused.text
            zone.set(NAME, ["127.0.0.2"])
            wait_until(lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 200, "ready")
            chats(url, 1)

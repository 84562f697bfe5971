"""dns+ upstreams: the spelling, the lookups (through a real DNS server on loopback,
bench/dns_zone.py) and the pool's membership as records come and go."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from bench.dns_zone import DnsZone
from scanner_gateway.config import Settings
from scanner_gateway.upstream.discovery import (
    DiscoveryFailed,
    DnsResolver,
    DnsUpstream,
    ReplicaDiscovery,
)
from scanner_gateway.upstream.pool import ReplicaPool
from scanner_gateway.upstream.routing import build_policy


def test_a_dns_upstream_is_a_name_and_a_port():
    assert DnsUpstream.parse("dns+http://vllm.ai.svc.cluster.local:8000") == DnsUpstream("http", "vllm.ai.svc.cluster.local", 8000)
    assert DnsUpstream.parse("dns+https://engines").port == 443
    assert DnsUpstream.parse(" DNS+http://vllm:8000") == DnsUpstream("http", "vllm", 8000)  # as is_dns_upstream reads it
    assert DnsUpstream("http", "vllm", 8000).url("10.0.0.7") == "http://10.0.0.7:8000"
    assert DnsUpstream("http", "vllm", 8000).url("fd00::7") == "http://[fd00::7]:8000"
    for bad, says in [("dns+ftp://vllm:21", "is dns\\+http://NAME:PORT"), ("dns+http://vllm:8000/v1", "no path"),
                      ("dns+http://10.0.0.7:8000", "an address, not a name")]:
        with pytest.raises(ValueError, match=says):
            DnsUpstream.parse(bad)


def test_settings_mix_urls_and_names_and_name_what_is_wrong():
    s = Settings(upstreams="http://10.0.0.5:8000, dns+http://vllm.ai:8000", dns_server="127.0.0.1:5353")
    assert s.upstream_urls() == ["http://10.0.0.5:8000"]
    assert s.upstream_names() == [DnsUpstream("http", "vllm.ai", 8000)]
    assert Settings(upstreams="dns+http://vllm:8000").upstream_urls() == []  # not SCANNER_UPSTREAM_URL
    with pytest.raises(ValidationError, match="no path"):
        Settings(upstreams="dns+http://vllm:8000/v1")
    with pytest.raises(ValidationError, match="not a nameserver address"):
        Settings(dns_server="dns.example:53")


@pytest.fixture
def zone():
    zone = DnsZone()
    with zone.serving() as server:
        zone.server = server
        yield zone


def test_every_a_and_aaaa_record_is_an_address(zone):
    zone.set("engines.test", ["127.0.0.2", "127.0.0.3", "::1"])
    resolver = DnsResolver(zone.server)
    assert asyncio.run(resolver.addresses("engines.test")) == {"127.0.0.2", "127.0.0.3", "::1"}
    assert asyncio.run(resolver.addresses("nothing.test")) == set()  # NXDOMAIN: no replicas
    zone.set("empty.test", [])
    assert asyncio.run(resolver.addresses("empty.test")) == set()  # a Service with no ready pod
    zone.set("broken.test", None)
    with pytest.raises(DiscoveryFailed, match="broken.test"):
        asyncio.run(resolver.addresses("broken.test"))


class Engine:
    """An engine client that answers at once, or when the test lets it (`gate`)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def health(self) -> None:
        pass

    async def metrics_text(self) -> str:
        return ""

    async def work(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.base_url


def test_replicas_join_and_leave_with_their_records_and_leaving_ones_finish(zone):
    async def scenario() -> None:
        engines: dict[str, Engine] = {}

        def client(url: str) -> Engine:
            return engines.setdefault(url, Engine(url))

        pool = ReplicaPool([], build_policy("round_robin"), probe_interval_s=3600)
        counts: list[int] = []
        pool.on_replica_count = counts.append
        discovery = ReplicaDiscovery(pool, [DnsUpstream("http", "engines.test", 8000)], DnsResolver(zone.server),
                                     client, interval_s=3600)
        assert not pool.ready()
        zone.set("engines.test", ["127.0.0.2", "127.0.0.3"])
        await discovery.start()
        assert pool.ready() and counts[-1] == 2
        answered = {await pool.call(lambda c: c.work()) for _ in range(4)}
        assert answered == {"http://127.0.0.2:8000", "http://127.0.0.3:8000"}

        # A request held at .2 while .2 leaves DNS: it finishes there; nothing new goes there.
        leaving = engines["http://127.0.0.2:8000"]
        leaving.gate = asyncio.Event()
        calls = [asyncio.create_task(pool.call(lambda c: c.work())) for _ in range(2)]  # one on each
        _, (held,) = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        zone.set("engines.test", ["127.0.0.3"])
        await discovery.refresh()
        assert counts[-1] == 1
        assert [r.url for r in pool.replicas if r.leaving] == [leaving.base_url]
        calls = leaving.calls
        assert {await pool.call(lambda c: c.work()) for _ in range(3)} == {"http://127.0.0.3:8000"}
        assert leaving.calls == calls
        leaving.gate.set()
        assert await held == leaving.base_url
        assert [r.url for r in pool.replicas] == ["http://127.0.0.3:8000"]  # dropped once idle

        # Several leaving at once, idle: all dropped in that round.
        zone.set("engines.test", ["127.0.0.3", "127.0.0.5", "127.0.0.6"])
        await discovery.refresh()
        assert counts[-1] == 3
        zone.set("engines.test", ["127.0.0.3"])
        await discovery.refresh()
        assert [r.url for r in pool.replicas] == ["http://127.0.0.3:8000"] and counts[-1] == 1

        # A lookup that fails keeps what was found; a new record joins at once.
        zone.set("engines.test", None)
        await discovery.refresh()
        assert [r.url for r in pool.replicas] == ["http://127.0.0.3:8000"]
        zone.set("engines.test", ["127.0.0.3", "127.0.0.4"])
        await discovery.refresh()
        assert {await pool.call(lambda c: c.work()) for _ in range(4)} == {"http://127.0.0.3:8000", "http://127.0.0.4:8000"}
        await discovery.close()
        await pool.close()

    asyncio.run(scenario())

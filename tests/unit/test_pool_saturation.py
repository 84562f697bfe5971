"""When the pool calls its engines saturated, from their last scraped gauges (no engine here:
the probe's reading is set directly, as a probe round would set it)."""

import asyncio

from scanner_gateway.upstream.gauges import EngineGauges
from scanner_gateway.upstream.pool import ReplicaPool
from scanner_gateway.upstream.routing import build_policy
from tests.unit.test_pool_stalls import StubClient


class MetricsClient(StubClient):
    def __init__(self, url: str, text: str) -> None:
        super().__init__(url)
        self.text = text

    async def health(self) -> None:
        return None

    async def metrics_text(self) -> str:
        return self.text


def pool(*gauges: EngineGauges, waiting: float = 4, kv: float = 0.95) -> ReplicaPool:
    p = ReplicaPool([StubClient(f"http://engine-{i}") for i in range(len(gauges))], build_policy("round_robin"),
                    saturation_waiting=waiting, saturation_kv=kv)
    for replica, g in zip(p.replicas, gauges, strict=True):
        replica.gauges = g
    return p


def test_an_engine_with_a_queue_or_a_full_kv_cache_is_saturated():
    assert not pool(EngineGauges(running=200, waiting=3, kv_cache_usage=0.5)).saturated()
    assert pool(EngineGauges(running=200, waiting=4, kv_cache_usage=0.5)).saturated()
    assert pool(EngineGauges(running=30, waiting=0, kv_cache_usage=0.96)).saturated()
    assert not pool(EngineGauges(waiting=4), waiting=5).saturated()  # the threshold is the setting's


def test_the_pool_is_saturated_only_when_every_healthy_replica_is():
    busy, idle = EngineGauges(waiting=9), EngineGauges()
    assert not pool(busy, idle).saturated()
    p = pool(busy, idle)
    p.replicas[1].healthy = False  # the idle one is down: requests could only go to the busy one
    assert p.saturated()
    p.replicas[0].healthy = False  # none healthy: the pool's 503, not a queue to wait in
    assert not p.saturated()


def test_unreadable_gauges_say_nothing():
    p = pool(EngineGauges(waiting=9))
    p.replicas[0].gauges_readable = False
    assert not p.saturated()


def test_every_gauge_reading_tells_admission():
    text = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 7\n"
    p = ReplicaPool([MetricsClient("http://engine-0", text)], build_policy("round_robin"))
    seen = []
    p.on_gauges = lambda: seen.append(p.saturated())
    asyncio.run(p.probe_all())
    assert seen == [True]

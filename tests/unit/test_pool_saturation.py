"""When the pool calls its engines saturated, from their last scraped gauges (no engine here:
the probe's reading is set directly, as a probe round would set it)."""

import asyncio

from scanner_gateway.upstream.gauges import EngineGauges
from scanner_gateway.upstream.pool import FULL_READINGS_TO_GROW, ReplicaPool
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


def pool(*gauges: EngineGauges, allowance: float = 0, kv: float = 0.95) -> ReplicaPool:
    p = ReplicaPool([StubClient(f"http://engine-{i}") for i in range(len(gauges))], build_policy("round_robin"),
                    queue_allowance=allowance, saturation_kv=kv)
    for replica, g in zip(p.replicas, gauges, strict=True):
        replica.read_gauges(g, in_flight_then=0)
    return p


def test_an_engine_with_a_queue_or_a_full_kv_cache_is_saturated():
    assert not pool(EngineGauges(running=200, waiting=0, kv_cache_usage=0.5)).saturated()
    assert pool(EngineGauges(running=200, waiting=1, kv_cache_usage=0.5)).saturated()  # one more would wait
    assert pool(EngineGauges(running=30, waiting=0, kv_cache_usage=0.96)).saturated()
    # The allowance: requests the gateway lets wait inside the engine.
    assert not pool(EngineGauges(running=8, waiting=3), allowance=4).saturated()
    assert pool(EngineGauges(running=8, waiting=4), allowance=4).saturated()


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
    text = ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 7\n"
            "vllm:num_requests_running{model_name=\"m\"} 8\n")
    p = ReplicaPool([MetricsClient("http://engine-0", text)], build_policy("round_robin"))
    seen = []
    p.on_gauges = lambda: seen.append(p.saturated())
    asyncio.run(p.probe_all())
    assert seen == [True]


def test_requests_sent_between_two_readings_count_towards_the_engines_queue():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    # A reading with 8 running and 2 waiting: it runs 8 at once. Every request sent since waits too.
    engine.in_flight = 10
    engine.read_gauges(EngineGauges(running=8, waiting=2), in_flight_then=10)
    assert p.saturated()
    engine.in_flight = 8  # two ended since: the two waiting run, all 8 seats taken
    assert p.saturated()
    engine.in_flight = 7  # a seat is free
    assert not p.saturated()
    # Later reading: 5 running, none waiting. Three seats free.
    engine.read_gauges(EngineGauges(running=5), in_flight_then=5)
    engine.in_flight = 7
    assert not p.saturated()
    engine.in_flight = 8
    assert p.saturated()


def test_a_queue_while_it_runs_its_most_sets_the_seats_and_a_burst_waiting_for_prefill_does_not():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.read_gauges(EngineGauges(running=14), in_flight_then=14)
    # A burst: 3 run while 11 wait for a step's token budget. Not a seat limit.
    engine.read_gauges(EngineGauges(running=3, waiting=11), in_flight_then=14)
    assert engine.seats == 0 and engine.capacity() == 28  # still the guess: twice the most seen
    engine.read_gauges(EngineGauges(running=16, waiting=2), in_flight_then=18)  # queue at its most
    assert engine.seats == 16
    engine.read_gauges(EngineGauges(running=3, waiting=11), in_flight_then=14)  # a burst again
    assert engine.seats == 16
    engine.read_gauges(EngineGauges(running=17), in_flight_then=17)  # another client's: it seats more
    assert engine.seats == 17
    engine.read_gauges(EngineGauges(running=2), in_flight_then=2)
    engine.in_flight = 16  # 15 seats free, 14 sent since
    assert not p.saturated()
    engine.in_flight = 17
    assert p.saturated()


def test_an_engine_never_seen_full_is_guessed_to_take_twice_what_it_ran():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.in_flight = 7  # nothing read yet: it takes at least 8 (SEATS_GUESS_FLOOR)
    assert not p.saturated()
    engine.in_flight = 8
    assert p.saturated()
    # It ran all 12 it had and queued none: it takes at least 24 then.
    engine.read_gauges(EngineGauges(running=12), in_flight_then=12)
    engine.in_flight = 23
    assert not p.saturated()
    engine.in_flight = 24
    assert p.saturated()


def test_saturation_has_the_gauges_read_again_soon():
    class Counting(MetricsClient):
        reads = 0

        async def metrics_text(self) -> str:
            Counting.reads += 1
            return await super().metrics_text()

    async def scenario() -> None:
        p = ReplicaPool([Counting("http://engine-0", "vllm:num_requests_waiting 9\n")], build_policy("round_robin"),
                        probe_interval_s=3600)
        await p.start()  # one reading: 9 waiting
        assert Counting.reads == 1
        let_in = []
        p.on_gauges = lambda: let_in.append(p.saturated())
        assert p.saturated()  # asks for a fresh reading, not an hour away
        async with asyncio.timeout(30):
            while not let_in:
                await asyncio.sleep(0.01)
        assert Counting.reads >= 2
        await p.close()

    asyncio.run(scenario())


def test_a_request_that_ended_between_the_engine_and_the_gateway_frees_one_seat_not_two():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.in_flight = 8
    engine.read_gauges(EngineGauges(running=8, waiting=1), in_flight_then=9)  # 8 seats
    engine.in_flight = 8  # the waiting one runs
    # Read as one ended in the engine while its answer was still on its way to us.
    engine.read_gauges(EngineGauges(running=7), in_flight_then=8)
    engine.in_flight = 7  # the answer arrived: one seat free, not two
    assert not p.saturated()
    engine.in_flight = 8
    assert p.saturated()


def test_other_clients_requests_take_seats_too():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.in_flight = 2
    engine.read_gauges(EngineGauges(running=8, waiting=1), in_flight_then=2)  # 7 from elsewhere
    assert p.saturated()
    engine.read_gauges(EngineGauges(running=6), in_flight_then=2)  # 4 from elsewhere, 2 seats free
    engine.in_flight = 3
    assert not p.saturated()
    engine.in_flight = 4
    assert p.saturated()


def test_requests_let_in_but_not_yet_sent_take_their_seats():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.read_gauges(EngineGauges(running=8, waiting=1), in_flight_then=9)  # 8 seats
    engine.in_flight = 6
    assert p.room(admitted=6) == 2
    assert p.room(admitted=7) == 1  # one let in is on its way to the engine
    assert p.room(admitted=8) == 0


def test_requests_sent_while_the_gauges_were_being_read_are_not_taken_for_other_clients():
    # The engine rendered its gauges after our 4 requests arrived, though the read began
    # with none of ours open: had those 4 been counted as someone else's, the seats
    # guessed (8) would look full.
    gate = asyncio.Event()

    class SlowMetrics(MetricsClient):
        async def metrics_text(self) -> str:
            await gate.wait()
            return self.text

    async def scenario() -> None:
        client = SlowMetrics("http://engine-0", "vllm:num_requests_running 4\nvllm:num_requests_waiting 0\n")
        p = ReplicaPool([client], build_policy("round_robin"), probe_interval_s=3600)
        engine = p.replicas[0]
        reading = asyncio.create_task(p._read_gauges(engine))
        await asyncio.sleep(0)
        for _ in range(4):
            p._count_in_flight(engine, +1)  # our 4 sent while the read is under way
        gate.set()
        await reading
        assert engine.in_flight_at_gauges == 4 and p.room(admitted=4) == 4  # 8 guessed, our 4 in them

    asyncio.run(scenario())


def test_each_seat_tried_in_vain_makes_the_next_try_wait_twice_as_long():
    p = pool(EngineGauges())
    engine = p.replicas[0]
    engine.read_gauges(EngineGauges(running=8, waiting=1), in_flight_then=9)
    assert engine.seats == 8 and engine.capacity() == 8

    def readings_until_a_try() -> int:
        for n in range(1, 1000):
            engine.read_gauges(EngineGauges(running=8), in_flight_then=8)
            if engine.capacity() == 9:
                return n
        raise AssertionError("never tried a ninth seat")

    assert readings_until_a_try() == FULL_READINGS_TO_GROW
    engine.read_gauges(EngineGauges(running=8, waiting=1), in_flight_then=9)  # there was no ninth
    assert engine.capacity() == 8
    assert readings_until_a_try() == 2 * FULL_READINGS_TO_GROW
    engine.read_gauges(EngineGauges(running=9), in_flight_then=9)  # this time it ran nine
    assert engine.seats == 9 and engine.readings_to_grow == FULL_READINGS_TO_GROW

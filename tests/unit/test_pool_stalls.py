"""A connect timeout while the gateway itself stood still is not held against the engine."""

import asyncio

import pytest

from scanner_gateway.errors import EngineError, EngineSlowToConnect, EngineUnreachable
from scanner_gateway.loop_lag import LoopStalls
from scanner_gateway.upstream.pool import FAILURES_TO_EJECT, ReplicaPool
from scanner_gateway.upstream.routing import build_policy


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StubClient:
    """Stands in for EngineClient: the pool only needs a URL; the op does the work."""

    def __init__(self, url: str) -> None:
        self.base_url = url


def lone_pool(*, stalled: bool, max_attempts: int = 3) -> ReplicaPool:
    return ReplicaPool([StubClient("http://engine-a")], build_policy("round_robin"),
                       max_attempts=max_attempts, stalled_since=lambda started: stalled)


def failing_then_answering(failures: int, exc_type: type[Exception] = EngineSlowToConnect):
    calls: list[str] = []

    async def op(client: StubClient) -> str:
        calls.append(client.base_url)
        if len(calls) <= failures:
            raise exc_type(f"engine at {client.base_url}: no connection in time")
        return "answer"

    return op, calls


def test_timeouts_during_a_stall_use_no_attempt_and_eject_nothing():
    pool = lone_pool(stalled=True)
    op, calls = failing_then_answering(failures=4)  # more than max_attempts - 1
    assert asyncio.run(pool.call(op)) == "answer"
    assert len(calls) == 5
    replica = pool.replicas[0]
    assert replica.healthy and replica.failures == 0


def test_stall_excuses_are_bounded_too():
    pool = lone_pool(stalled=True, max_attempts=2)
    op, calls = failing_then_answering(failures=100)
    with pytest.raises(EngineSlowToConnect):
        asyncio.run(pool.call(op))
    assert len(calls) == 4  # 2 excused + 2 counted attempts: never a retry loop without end
    assert pool.replicas[0].failures == 2


def test_without_a_stall_timeouts_count_and_use_up_attempts():
    pool = lone_pool(stalled=False)
    op, calls = failing_then_answering(failures=100)
    with pytest.raises(EngineSlowToConnect):
        asyncio.run(pool.call(op))
    assert len(calls) == 3
    assert pool.replicas[0].failures == 3


def test_a_concurrent_burst_of_timeouts_without_a_stall_still_ejects():
    pool = lone_pool(stalled=False, max_attempts=1)

    async def burst() -> None:
        op, _ = failing_then_answering(failures=10**6)
        results = await asyncio.gather(*(pool.call(op) for _ in range(FAILURES_TO_EJECT)),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineSlowToConnect) for r in results)

    asyncio.run(burst())
    assert not pool.replicas[0].healthy


@pytest.mark.parametrize("exc_type", [EngineUnreachable, EngineError])
def test_a_stall_excuses_only_failures_a_busy_engine_can_cause(exc_type):
    # Refused connections and engine errors say something about the engine, stall or not.
    pool = lone_pool(stalled=True)
    op, calls = failing_then_answering(failures=100, exc_type=exc_type)
    with pytest.raises(exc_type):
        asyncio.run(pool.call(op))
    assert len(calls) == 1


def test_loop_stalls_knows_nothing_without_a_watcher():
    clock = FakeClock()
    stalls = LoopStalls(clock=clock)
    clock.now += 3600
    assert not stalls.stalled_since(clock.now - 10)


def test_loop_stalls_sees_a_reported_stall_after_the_attempt_began():
    clock = FakeClock()
    stalls = LoopStalls(interval_s=0.5, stall_s=1.0, clock=clock)
    stalls.observe(0.001)
    started = clock.now
    clock.now += 0.5
    stalls.observe(0.002)
    assert not stalls.stalled_since(started)  # on time: a timeout now is the engine's
    clock.now += 4.0
    stalls.observe(3.5)
    assert stalls.stalled_since(started)
    assert not stalls.stalled_since(clock.now + 0.1)  # an attempt begun after the stall


def test_loop_stalls_sees_a_stall_the_watcher_has_not_reported_yet():
    clock = FakeClock()
    stalls = LoopStalls(interval_s=0.5, stall_s=1.0, clock=clock)
    stalls.observe(0.0)
    started = clock.now
    clock.now += 1.2  # the watcher is a bit late: not yet a stall
    assert not stalls.stalled_since(started)
    clock.now += 3.0  # the watcher's wake-up is seconds overdue: the loop stood still
    assert stalls.stalled_since(started)

import asyncio
import math

import pytest

from scanner_gateway.admission import AdmissionController, parse_priority
from scanner_gateway.errors import InvalidRequest, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_parse_priority():
    assert parse_priority(None, "batch") == "batch"
    assert parse_priority(" Interactive ", "batch") == "interactive"
    with pytest.raises(InvalidRequest):
        parse_priority("urgent", "batch")


def test_refuses_at_once_when_the_expected_wait_passes_the_deadline():
    async def main():
        gate = AdmissionController(1, 10, max_wait_s=60, initial_hold_s=5.0)
        loop = asyncio.get_running_loop()
        async with gate.slot("interactive"):
            with pytest.raises(Overloaded) as exc:
                async with gate.slot("interactive", deadline=loop.time() + 1.0):
                    pass
        assert exc.value.headers["Retry-After"] == "5"
        assert gate.stats.rejected["interactive"] == 1 and gate.in_flight == 0

    run(main())


def test_a_waiter_that_times_out_leaves_the_queue_and_the_slot_moves_on():
    async def main():
        gate = AdmissionController(1, 10, max_wait_s=0.05, initial_hold_s=0.01)
        order = []

        async def user(name, hold):
            try:
                async with gate.slot("batch"):
                    order.append(name)
                    await asyncio.sleep(hold)
            except Overloaded:
                order.append(f"{name}:429")

        await user("warm-up", 0)  # a warm gate: a cold one queues a round at most (below)
        order.clear()
        await asyncio.gather(user("a", 0.2), user("b", 0), user("c", 0))
        assert order == ["a", "b:429", "c:429"]
        assert gate.in_flight == 0 and gate.queued() == 0
        async with gate.slot("batch"):  # the gate still works
            assert gate.in_flight == 1

    run(main())


def test_cancelled_waiter_does_not_leak_its_slot():
    async def main():
        gate = AdmissionController(1, 10, max_wait_s=5)
        async with gate.slot("batch"):
            waiter = asyncio.create_task(gate.slot("batch").__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            await asyncio.sleep(0.01)
        assert gate.in_flight == 0 and gate.queued() == 0

    run(main())


def test_expected_wait_follows_when_running_requests_free_their_slots():
    now = [0.0]
    gate = AdmissionController(2, 10, max_wait_s=0.5, initial_hold_s=1.0, clock=lambda: now[0])
    gate._started = {1: 0.0, 2: 0.6}  # two running: one frees at 1.0, the other at 1.6
    gate.in_flight = 2
    now[0] = 0.3
    assert gate._expected_wait_s(0) == pytest.approx(0.7)  # the next slot frees at 1.0
    assert gate._expected_wait_s(1) == pytest.approx(1.3)  # then at 1.6
    assert gate._expected_wait_s(2) == pytest.approx(1.7)  # a round later
    gate.in_flight = 1  # one slot free right now
    gate._started = {2: 0.6}
    assert gate._expected_wait_s(0) == 0.0


def test_with_no_cap_the_expected_wait_counts_only_the_room_the_engines_have():
    now = [0.0]
    engines = Engines()
    gate = AdmissionController(512, 10, max_wait_s=0.5, initial_hold_s=1.0, clock=lambda: now[0],
                               engine_room=engines)
    gate._started = {i: 0.1 * i for i in range(4)}  # four running, freeing at 1.0, 1.1, 1.2, 1.3
    gate.in_flight = 4
    engines.room = 1  # the engines take one more now
    now[0] = 0.5
    assert gate._expected_wait_s(0) == 0.0  # the first in the queue takes it
    assert gate._expected_wait_s(1) == pytest.approx(0.5)  # the next waits for the first end
    assert gate._expected_wait_s(2) == pytest.approx(0.6)


def test_a_cold_start_learns_the_hold_from_the_running_requests():
    # Just restarted: the average is the 1 s guess and nothing has finished to correct it,
    # but both running requests have held their slots for 10 s already.
    now = [0.0]
    gate = AdmissionController(2, 100, max_wait_s=15, initial_hold_s=1.0, clock=lambda: now[0])
    gate._started = {1: 0.0, 2: 0.0}
    gate.in_flight = 2
    now[0] = 10.0
    # Each has run 10 s, so is expected to run ~10 s more (holds of 20 s): the first slot
    # frees in 10 s, then two more rounds of 20 s; not rounds of 1 s.
    assert gate._expected_wait_s(4) == pytest.approx(10.0 + 2 * 20.0)
    gate.full_finished = 1  # once a hold at full load was seen, the ages are just a lower bound on it
    assert gate._expected_wait_s(4) == pytest.approx(20.0)
    gate.full_hold_s = 30.0  # a learnt average longer than the ages stands
    assert gate._expected_wait_s(4) == pytest.approx(20.0 + 2 * 30.0)


def test_a_cold_start_queues_one_round_at_most():
    async def main():
        gate = AdmissionController(2, 100, max_wait_s=60)
        release = asyncio.Event()

        async def hold():
            async with gate.slot("batch"):
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(4)]  # 2 run, 2 wait: one round
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as exc:
            async with gate.slot("batch"):
                pass
        assert "no request has finished" in exc.value.message
        release.set()
        await asyncio.gather(*tasks)
        assert gate.full_finished == 3  # once holds at full load are known, the wait estimate decides again
        release.clear()
        tasks = [asyncio.create_task(hold()) for _ in range(5)]
        await asyncio.sleep(0)
        assert gate.in_flight == 2 and gate.queued() == 3
        release.set()
        await asyncio.gather(*tasks)

    run(main())


async def hold(gate: AdmissionController, now: list[float], seconds: float) -> None:
    """Hold a slot for `seconds` of the fake clock `now`."""
    async with gate.slot("batch"):
        now[0] += seconds


def test_the_first_finished_requests_replace_the_initial_guess():
    now = [0.0]
    gate = AdmissionController(1, 10, max_wait_s=60, initial_hold_s=1.0, clock=lambda: now[0])
    run(hold(gate, now, 10.0))
    assert gate.avg_hold_s == pytest.approx(10.0)  # not 1.0 + 10% of the way
    run(hold(gate, now, 20.0))
    assert gate.avg_hold_s == pytest.approx(15.0)  # the mean of the first ones


def test_holds_seen_below_full_load_do_not_time_a_full_queue():
    # A batching engine answers a request that finds it idle fast and the same request in
    # a full batch slower: the light-load hold must not promise short waits to a full queue.
    now = [0.0]
    gate = AdmissionController(2, 100, max_wait_s=60, initial_hold_s=1.0, clock=lambda: now[0])
    run(hold(gate, now, 0.2))  # alone
    assert gate.avg_hold_s == pytest.approx(0.2) and gate.full_finished == 0
    gate._started, gate.in_flight, now[0] = {1: 10.0, 2: 10.0}, 2, 10.5  # a burst fills both slots
    # Each running request is expected to last twice its age (1 s), not the 0.2 s seen alone:
    # the first slot frees in 0.5 s, and a round after that takes 1 s.
    assert gate._expected_wait_s(2) == pytest.approx(0.5 + 1.0)

    async def full_load():  # both slots taken: these holds are learnt as full-load ones
        async with gate.slot("batch"), gate.slot("batch"):
            now[0] += 3.0

    gate._started, gate.in_flight, now[0] = {}, 0, 20.0
    run(full_load())
    assert gate.full_finished == 1 and gate.full_hold_s == pytest.approx(3.0)
    gate._started, gate.in_flight, now[0] = {1: 30.0, 2: 30.0}, 2, 30.5
    assert gate._expected_wait_s(2) == pytest.approx(2.5 + 3.0)


def test_check_refuses_as_slot_would_without_taking_a_place():
    async def main():
        gate = AdmissionController(1, 0, max_wait_s=60)  # one slot, no queue
        gate.check("interactive")  # a free slot: nothing to refuse
        async with gate.slot("interactive"):
            with pytest.raises(Overloaded):
                gate.check("batch")
            assert gate.queued() == 0 and gate.in_flight == 1
        gate.check("batch")
        assert gate.stats.rejected["batch"] == 1 and gate.in_flight == 0

    run(main())


class Engines:
    """What the pool says about the engines' room, set by the test: none when `saturated`,
    else `room` (no limit unless set)."""

    def __init__(self) -> None:
        self.saturated = False
        self.room = math.inf

    def __call__(self, admitted: int) -> float:
        return 0.0 if self.saturated else self.room


async def until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never: {what}")


def test_without_a_cap_requests_run_until_the_engines_say_they_are_saturated():
    async def main():
        engines = Engines()
        gate = AdmissionController(512, 10, max_wait_s=60, engine_room=engines)
        release = asyncio.Event()

        async def hold():
            async with gate.slot("batch"):
                await release.wait()

        early = [asyncio.create_task(hold()) for _ in range(40)]  # far past any fixed cap of old
        await until(lambda: gate.in_flight == 40, "all 40 run")
        assert gate.queued() == 0
        engines.saturated = True
        late = asyncio.create_task(hold())
        await until(lambda: gate.queued() == 1, "the 41st waits in the gateway")
        gate.refresh()  # gauges read again, still saturated: nobody more goes in
        assert gate.queued() == 1 and gate.in_flight == 40
        engines.saturated = False
        gate.refresh()  # the engines caught up
        assert gate.queued() == 0 and gate.in_flight == 41
        release.set()
        await asyncio.gather(*early, late)
        assert gate.in_flight == 0

    run(main())


def test_an_end_lets_the_best_waiter_in_only_when_the_engines_have_room():
    async def main():
        engines = Engines()
        gate = AdmissionController(512, 10, max_wait_s=60, engine_room=engines)
        order = []
        gates = {name: asyncio.Event() for name in ("first", "second", "batch", "interactive")}

        async def user(name, klass):
            async with gate.slot(klass):
                order.append(name)
                await gates[name].wait()

        running = [asyncio.create_task(user("first", "batch")), asyncio.create_task(user("second", "batch"))]
        await until(lambda: gate.in_flight == 2, "two run")
        engines.saturated = True
        waiters = [asyncio.create_task(user("batch", "batch"))]
        await until(lambda: gate.queued() == 1, "batch queued")
        waiters.append(asyncio.create_task(user("interactive", "interactive")))
        await until(lambda: gate.queued() == 2, "interactive queued")
        # An end while the engines are still full (a queue inside them) frees its slot, lets nobody in.
        gates["first"].set()
        await running[0]
        assert gate.in_flight == 1 and gate.queued() == 2
        # The next end finds room (what it left is a free seat): the best waiter takes its slot.
        engines.saturated = False
        gates["second"].set()
        await running[1]
        await until(lambda: order[2:] == ["interactive"], "the interactive one took the slot")
        assert gate.in_flight == 1 and gate.queued() == 1  # handed over
        gates["interactive"].set()
        gates["batch"].set()
        await asyncio.gather(*waiters)
        assert order == ["first", "second", "interactive", "batch"] and gate.in_flight == 0

    run(main())


def test_saturated_engines_and_a_full_queue_give_429_at_once():
    async def main():
        engines = Engines()
        engines.saturated = True
        gate = AdmissionController(512, 0, max_wait_s=60, engine_room=engines)  # no queue
        with pytest.raises(Overloaded):
            gate.check("interactive")
        with pytest.raises(Overloaded):
            async with gate.slot("interactive"):
                pass
        assert gate.in_flight == 0 and gate.stats.rejected["interactive"] == 2

    run(main())


def test_while_saturated_the_queue_is_timed_by_the_requests_that_run():
    # Each running request's end lets one waiter in: with one running request holding
    # its slot ~1 s, the first waiter starts in ~1 s, the second in ~2 s, the third in ~3 s.
    now = [0.0]
    engines = Engines()

    async def main():
        gate = AdmissionController(512, 10, max_wait_s=2.5, initial_hold_s=1.0, clock=lambda: now[0],
                                   engine_room=engines)
        async with gate.slot("batch"):
            engines.saturated = True  # the engines filled up while it ran
            now[0] += 1.0  # one full-load hold learnt: the queue may be timed by it
        engines.saturated = False
        async with gate.slot("batch"):
            engines.saturated = True
            waiters = [asyncio.create_task(gate.slot("batch").__aenter__()) for _ in range(2)]
            await until(lambda: gate.queued() == 2, "two queued")
            with pytest.raises(Overloaded):  # a third would wait ~3 s > 2.5 s
                gate.check("batch")
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    run(main())


def test_a_batch_waiter_pushed_past_its_bound_by_interactive_arrivals_is_refused_at_once():
    # One slot held ~1 s. A batch request may wait 1.5 s: it queues (expected ~1 s). An
    # interactive one then goes ahead of it: the batch one would wait ~2 s, so it gets its
    # 429 now, not after waiting out its grace (3 x 1.5 s).
    now = [0.0]

    async def main():
        gate = AdmissionController(1, 10, max_wait_s=1.5, initial_hold_s=1.0, clock=lambda: now[0])
        await hold(gate, now, 1.0)  # one full-load hold learnt: 1 s
        async with gate.slot("interactive"):
            batch = asyncio.create_task(gate.slot("batch").__aenter__())
            await until(lambda: gate.queued("batch") == 1, "batch queued")
            interactive = asyncio.create_task(gate.slot("interactive").__aenter__())
            await until(lambda: batch.done(), "batch refused")
            assert isinstance(batch.exception(), Overloaded)
            assert gate.queued("interactive") == 1 and gate.queued("batch") == 0
            assert gate.stats.rejected["batch"] == 1
        await interactive  # the held slot went to the interactive one
        assert gate.in_flight == 1

    run(main())

"""Admission control: bounded concurrency, a bounded priority queue, and fast 429s.

At most `max_in_flight` requests run; up to `queue_limit` more wait, `interactive` ones
ahead of `batch` ones (first come, first served within a class). A request is refused
at once with 429 and a `Retry-After` when the queue is full or its expected wait is
longer than it may wait (`max_wait_s`, or its own deadline). A request let in to wait
was expected to get a slot in time; it is refused late only if it waited
`WAIT_GRACE` times that long (the estimate was badly wrong). So overload gets fast
429s, never a pile-up, never a 5xx.

The expected wait comes from when the running requests should free their slots: each
started at a known time and holds its slot for about the recent average (an exponential
moving average). Slots often free in bursts (requests batched together finish
together), which a plain "queue x average / slots" estimate misses.

Only holds measured with every slot taken time a queue: a batching engine answers the
first requests of a burst fast (they found it idle) and the rest several times slower,
so an average over all holds promised short waits to a full queue (a fake engine that
slows so, bench/upload_burst.py: admitted p99 4.7-4.9 s against a bound of 3.0 s, then
3.04 s; on an H200, admitted scans waited ~2.5x the queue-wait setting).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from scanner_gateway.errors import InvalidRequest, Overloaded, echo
from scanner_gateway.tracing import TRACER

if TYPE_CHECKING:  # the metrics are passed in: the domain does not load prometheus_client
    from scanner_gateway.metrics import GatewayMetrics

PriorityClass = Literal["interactive", "batch"]
PRIORITY_CLASSES: tuple[PriorityClass, ...] = ("interactive", "batch")  # first runs first
PRIORITY_HEADER = "x-priority"
EWMA_WEIGHT = 0.1  # each finished request moves the average hold time by 10% (once warm)
# Slots free in bursts (a batch finishes together), so a fair estimate is sometimes
# late: a waiter we let in may wait this many times `max_wait_s` before a late 429.
WAIT_GRACE = 3.0


def _learn(average: float, sample: float, samples: int) -> float:
    """The first samples replace the initial guess quickly (a plain mean of the first
    ten), then the average moves EWMA_WEIGHT of the way per sample."""
    return average + max(EWMA_WEIGHT, 1 / samples) * (sample - average)


def parse_priority(value: str | None, default: PriorityClass, param: str = "X-Priority") -> PriorityClass:
    if value is None or not value.strip():
        return default
    value = value.strip().lower()
    if value not in PRIORITY_CLASSES:
        raise InvalidRequest(
            f"{param} must be one of {', '.join(PRIORITY_CLASSES)}; got {echo(value)}", param=param
        )
    return value  # type: ignore[return-value]


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    future: asyncio.Future[bool] = field(compare=False)
    wait_until: float = field(compare=False, default=math.inf)  # when its wait passes its bound


@dataclass
class AdmissionStats:
    admitted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))


class AdmissionController:
    def __init__(
        self,
        max_in_flight: int,
        queue_limit: int,
        max_wait_s: float,
        *,
        initial_hold_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
        engine_room: Callable[[int], float] = lambda admitted: math.inf,
    ) -> None:
        self.max_in_flight = max_in_flight
        # Requests the engines take now without queueing, given how many this gateway let in.
        self._engine_room = engine_room
        self.queue_limit = queue_limit
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self.avg_hold_s = initial_hold_s  # every hold: Retry-After, and a floor until full_hold_s is known
        self.finished = 0  # requests that released a slot: how much the average has learnt
        self.full_hold_s = initial_hold_s  # holds of requests that ran with every slot taken
        self.full_finished = 0
        self._started: dict[int, float] = {}  # running request -> when it got its slot
        self.stats = AdmissionStats()
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._clock = clock
        self.metrics = metrics

    def queued(self, klass: PriorityClass | None = None) -> int:
        if klass is None:
            return len(self._queue)
        rank = PRIORITY_CLASSES.index(klass)
        return sum(1 for w in self._queue if w.rank == rank and not w.future.done())

    def _hold_estimate_s(self, now: float) -> float:
        """The recent average hold at full load, unless most running requests already held
        their slots longer: then the average is stale (a shift to longer requests) and their
        median age is the better bound. Before any request has finished at full load (a
        cold start, or the first burst) the average is only a lower bound (a guess, or
        holds at a lighter load) and so is the age: a request that has run for t is
        expected to run about as long again (2t), so a gateway under its first burst does
        not queue rounds of requests on the promise that every slot is about to free."""
        cold = self.full_finished == 0
        learnt = self.avg_hold_s if cold else self.full_hold_s
        ages = sorted(now - start for start in self._started.values())
        if not ages:
            return learnt
        median_age = ages[len(ages) // 2]
        return max(learnt, median_age * (2 if cold else 1))

    def _room(self) -> bool:
        """A request may start now: under the cap, and the engines take one more."""
        return self.in_flight < self.max_in_flight and self._engine_room(self.in_flight) >= 1

    def _saturated(self) -> bool:
        return self._engine_room(self.in_flight) < 1

    def _slots(self) -> int:
        """Requests that run at once from here on: those running plus what the engines
        take now, within the cap (each end lets one more in)."""
        return max(1, min(self.max_in_flight, self.in_flight + int(min(self._engine_room(self.in_flight), self.max_in_flight))))

    def _expected_wait_s(self, ahead: int) -> float:
        """Wait of a request with `ahead` requests queued before it."""
        return self._waits()(ahead)

    def _waits(self) -> Callable[[int], float]:
        """The expected wait as a function of the requests queued ahead, for now: the
        slots' release times are sorted once for any number of questions."""
        now = self._clock()
        hold = self._hold_estimate_s(now)
        slots = self._slots()
        releases = [start + hold for start in self._started.values()]
        handed_over = self.in_flight - len(releases)  # given to a waiter that has yet to start
        releases += [now + hold] * handed_over
        releases += [now] * max(0, slots - self.in_flight)
        releases = sorted(releases)[:slots] or [now + hold]

        def wait(ahead: int) -> float:
            rounds, index = divmod(ahead, len(releases))
            return max(0.0, releases[index] - now) + rounds * hold

        return wait

    def _export(self, queue_changed: bool = False) -> None:
        if self.metrics is None:
            return
        self.metrics.in_flight.set(self.in_flight)
        if queue_changed:
            for klass in PRIORITY_CLASSES:
                self.metrics.queued.labels(klass).set(self.queued(klass))

    def _refuse(self, klass: PriorityClass, why: str, expected_s: float) -> Overloaded:
        self.stats.rejected[klass] += 1
        if self.metrics is not None:
            self.metrics.rejections.labels(klass).inc()
        retry_after = max(1, math.ceil(expected_s))
        return Overloaded(f"gateway overloaded ({why}); retry in {retry_after} s", retry_after_s=retry_after)

    @asynccontextmanager
    async def slot(self, klass: PriorityClass, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one of the `max_in_flight` slots for the duration of the block."""
        rank = PRIORITY_CLASSES.index(klass)
        # full: every slot taken when this one started, so its hold is one at full load
        if not self._queue and self._room():
            self.in_flight += 1
            full = self.in_flight == self.max_in_flight  # it took the last free slot
        else:
            # A span only for a wait (or its 429): a slot found free at once costs no span.
            with TRACER.start_as_current_span("admission", attributes={"scanner.priority": klass}):
                # Full if handed over by a request that ended with others waiting; not if let
                # in because the engines had room again.
                full = await self._wait(klass, rank, deadline)
        self.stats.admitted[klass] += 1
        token = next(self._seq)
        started = self._started[token] = self._clock()
        self._export()
        try:
            yield
        finally:
            del self._started[token]
            held = self._clock() - started
            self.finished += 1
            self.avg_hold_s = _learn(self.avg_hold_s, held, self.finished)
            if full or self._saturated():  # the engines were full when it ended: a full-load hold
                self.full_finished += 1
                self.full_hold_s = _learn(self.full_hold_s, held, self.full_finished)
            handed_over = self._release()
            self._export(queue_changed=handed_over)

    def check(self, klass: PriorityClass, deadline: float | None = None) -> None:
        """Raise the 429 that `slot` would raise now, without taking a place: for work a
        request does before it asks for a slot (downloading its photos), so that an
        overloaded gateway refuses before that work, not after it."""
        if self._queue or not self._room():
            self._refuse_if_full(klass, PRIORITY_CLASSES.index(klass), deadline)

    def _refuse_if_full(self, klass: PriorityClass, rank: int, deadline: float | None) -> None:
        ahead = sum(1 for w in self._queue if w.rank <= rank)
        expected = self._expected_wait_s(ahead)
        may_wait = self.max_wait_s
        if deadline is not None:
            may_wait = min(may_wait, deadline - self._clock())
        if len(self._queue) >= self.queue_limit:
            raise self._refuse(klass, f"{len(self._queue)} requests already queued", expected)
        if self.full_finished == 0 and ahead >= self._slots():
            # Until one request has finished at full load nobody knows how long a slot is
            # held then: queue no more than one round (a wait of one hold), not rounds on a guess.
            raise self._refuse(klass, "no request has finished at full load yet to time the queue by", expected)
        if expected > may_wait:
            raise self._refuse(klass, f"expected wait {expected:.1f} s is over {may_wait:.1f} s", expected)

    async def _wait(self, klass: PriorityClass, rank: int, deadline: float | None) -> bool:
        """Until a slot is this request's; whether it was handed over (True) or found free."""
        self._refuse_if_full(klass, rank, deadline)
        may_wait = self.max_wait_s if deadline is None else min(self.max_wait_s, deadline - self._clock())
        waiter = _Waiter(rank, next(self._seq), asyncio.get_running_loop().create_future(),
                         self._clock() + may_wait)
        heapq.heappush(self._queue, waiter)
        self._shed_overtaken(rank)
        self._export(queue_changed=True)
        patience = self.max_wait_s * WAIT_GRACE
        if deadline is not None:
            patience = min(patience, deadline - self._clock())
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=max(patience, 0))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # the slot arrived just as we gave up: pass it on
            else:
                waiter.future.cancel()
                self._queue.remove(waiter)
                heapq.heapify(self._queue)
            self._export(queue_changed=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._refuse(klass, f"waited {patience:.1f} s for a free slot", self.avg_hold_s) from None
        return waiter.future.result()

    def _shed_overtaken(self, rank: int) -> None:
        """A request of a higher class went ahead of waiting ones: refuse at once those it
        pushed past their bound, rather than after waiting out the grace for it."""
        if rank == len(PRIORITY_CLASSES) - 1:
            return  # nothing waits in a lower class
        now, wait = self._clock(), self._waits()
        shed: list[_Waiter] = []
        for place, waiter in enumerate(sorted(self._queue)):
            if waiter.rank <= rank or waiter.future.done():
                continue
            expected = wait(place - len(shed))
            if now + expected > waiter.wait_until:
                shed.append(waiter)
                waiter.future.set_exception(self._refuse(
                    PRIORITY_CLASSES[waiter.rank], "requests of a higher priority went ahead", expected))
        if shed:
            self._queue = [w for w in self._queue if w not in shed]
            heapq.heapify(self._queue)

    def resize(self, max_in_flight: int) -> None:
        """A new cap (replicas joined or left): waiters go in at once if it grew."""
        self.max_in_flight = max_in_flight
        self.refresh()

    def refresh(self) -> None:
        """Let waiters in while there is room: called when the engines' gauges were read
        (a saturated engine may have caught up; an ending request hands its slot over)."""
        woke = False
        while self._queue and self._room():
            waiter = heapq.heappop(self._queue)
            if not waiter.future.done():
                self.in_flight += 1
                waiter.future.set_result(False)
                woke = True
        if woke:
            self._export(queue_changed=True)

    def _release(self) -> bool:
        """Give the slot to the best waiter (True), or free it. Not while the engines are
        saturated: a queue inside them (a burst sent before their gauges showed it) would
        otherwise be kept full for good, one waiter in for each request out."""
        self.in_flight -= 1
        while self._queue and self._room():
            waiter = heapq.heappop(self._queue)
            if not waiter.future.done():
                self.in_flight += 1
                waiter.future.set_result(True)
                return True
        return False

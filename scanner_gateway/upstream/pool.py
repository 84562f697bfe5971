"""ReplicaPool: several vLLM replicas behind one interface, with health, routing and retries.

- A background monitor probes each replica's `/health` and scrapes its queue gauges
  every `probe_interval_s`. A replica that refuses connections (to a request or a probe)
  or fails its health probe with 503 is ejected at once; one that fails
  `FAILURES_TO_EJECT` probes or requests in a row (hung, not just busy) too.
  Ejected replicas are re-probed after a backoff that doubles up to `MAX_EJECT_S`, and
  re-admitted on their first healthy answer (a circuit breaker).
- Every request picks a replica with the routing policy and counts itself in flight there.
- A request that could not reach a replica (refused, 503, connection dropped before any
  answer) is retried on another one, at most `max_attempts` times with a jittered pause;
  a replica that only dropped the connection or was slow to connect may be tried again
  when no untried one is left.
  With no routable replica left it fails at once with 503: never a hang.
- Such a flaky failure (dropped, slow to connect) during which the gateway's own event
  loop stood still (`stalled_since`, from the loop-lag watcher) is no evidence against
  the engine: it counts towards no ejection, and its retry uses up no attempt (at most
  `max_attempts` such retries more). A machine that freezes every process for seconds
  at a time otherwise turned one freeze into a 503 for every request then in flight.
- Membership can change while it runs (`sync`, fed by DNS discovery): a replica that
  joins is probed at once and routed to when healthy; one that leaves takes no new
  request, and is dropped once its requests in flight have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from opentelemetry.trace import SpanKind

from scanner_gateway.errors import (
    EngineError,
    EngineFlaky,
    EngineUnreachable,
    ModelNotServed,
    UpstreamError,
    UpstreamUnavailable,
)
from scanner_gateway.protocol import ChatCompletion, ModelCard
from scanner_gateway.tracing import TRACER, server_attributes
from scanner_gateway.upstream.client import EngineClient
from scanner_gateway.upstream.gauges import EngineGauges, parse_engine_gauges
from scanner_gateway.upstream.routing import ReplicaLoad, RoutingPolicy

if TYPE_CHECKING:  # the metrics are passed in: the domain does not load prometheus_client
    from scanner_gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# A slow probe is not a dead replica: an engine saturating its CPUs answers /health
# late. Only a run this long of failed probes or requests (a hung engine) ejects it.
FAILURES_TO_EJECT = 10
MIN_EJECT_S = 0.5
# Requests the gateway lets wait inside a full engine. 0: it sends only into a free seat;
# a request waiting there waits where the gateway's priorities and 429s no longer reach it
# (a small engine frees its seats in batches seconds apart, so that wait is long).
DEFAULT_QUEUE_ALLOWANCE = 0
DEFAULT_SATURATION_KV = 0.95
# Until an engine has been seen full, it is taken to run at least this many at once, or
# twice the most it was seen running: a guess that grows with each reading, as TCP's slow
# start does, so a cold gateway's first burst does not all land in the engine's queue.
SEATS_GUESS_FLOOR = 8
# Readings in a row of an engine running all the seats it was thought to have, none waiting,
# before one more is tried: each try may leave a request waiting in it for a whole batch,
# so each try that finds a queue doubles the readings before the next (up to the most).
FULL_READINGS_TO_GROW = 8
MOST_READINGS_TO_GROW = 128
# When every replica turns saturated the gauges are read at once (not only at the next
# probe), then at most this often more while it lasts: vLLM renders its whole /metrics
# page for each read: 4 a second held a 2-CPU engine to 0.61x the scans/s it gave straight
# (bench/ab.py, c=8), 1 a second left 0.945x.
SATURATED_READ_GAP_S = 1.0
MAX_EJECT_S = 5.0
RETRY_PAUSE_S = 0.01  # first retry waits up to 10 ms, the next up to 20 ms, ...


@dataclass
class Replica:
    index: int  # unique in its pool, never reused
    client: EngineClient
    discovered: bool = False  # found by DNS (may leave), not configured
    leaving: bool = False  # gone from DNS: no new requests; dropped when idle
    healthy: bool = True  # optimistic until the first probe says otherwise
    in_flight: int = 0
    gauges: EngineGauges = field(default_factory=EngineGauges)
    failures: int = 0
    gauges_readable: bool = True  # so an engine without usable /metrics is logged once, not every probe
    in_flight_at_gauges: int = 0  # this gateway's requests at the replica when its gauges were read
    # Reads of its gauges under way: the most requests this gateway had at it during each.
    read_peaks: list[list[int]] = field(default_factory=list)
    seats: float = 0.0  # requests it runs at once, learnt from its gauges (0: not yet)
    seen_running: float = 0.0  # the most it was seen running at all
    full_readings: int = 0  # readings in a row with every seat taken and none waiting
    readings_to_grow: int = FULL_READINGS_TO_GROW
    trying_more: bool = False  # one seat more is being tried
    eject_s: float = MIN_EJECT_S
    probe_after: float = 0.0

    @property
    def url(self) -> str:
        return self.client.base_url

    def read_gauges(self, gauges: EngineGauges, in_flight_then: int) -> None:
        """Learn its seats. Requests waiting while it runs as many as it ever ran set them
        (a queue at a lower count is a burst waiting for a step's token budget, not for a
        seat); it running more raises them. All seats taken with none waiting,
        `readings_to_grow` readings in a row, lets one more be tried; a try that meets a
        queue instead doubles that count."""
        highest = gauges.running >= self.seen_running
        self.gauges, self.in_flight_at_gauges = gauges, in_flight_then
        self.seen_running = max(self.seen_running, gauges.running)
        if gauges.running > self.seats and (self.seats or (highest and gauges.waiting > 0)):
            self.seats = gauges.running
            if self.trying_more:  # it ran the seat tried
                self.trying_more, self.readings_to_grow = False, FULL_READINGS_TO_GROW
        elif self.trying_more and gauges.waiting > 0:  # the seat tried was not there
            self.trying_more = False
            self.readings_to_grow = min(2 * self.readings_to_grow, MOST_READINGS_TO_GROW)
        full = bool(self.seats) and gauges.waiting == 0 and gauges.running >= self.seats
        self.full_readings = self.full_readings + 1 if full and not self.trying_more else 0
        if self.full_readings >= self.readings_to_grow:
            self.trying_more, self.full_readings = True, 0

    def capacity(self) -> float:
        """Requests it runs at once, as far as the gateway knows: its seats (and one more
        while that is tried), or, never seen with a queue at its highest, at least
        SEATS_GUESS_FLOOR or twice the most it was seen running."""
        if self.seats:
            return self.seats + self.trying_more
        return max(SEATS_GUESS_FLOOR, 2 * self.seen_running)

    def room(self, queue_allowance: float, kv_cache_usage: float) -> float:
        """Requests it takes now before one more would wait inside it beyond
        `queue_allowance`: its gauges as last read, corrected by what this gateway sent (or
        saw end) since. Gauges are read about once a second; without the correction a burst
        arriving between two reads would all go into the engine's own queue, out of reach
        of the gateway's priorities and 429s. Unreadable gauges say nothing (no limit)."""
        if not self.gauges_readable:
            return math.inf
        if self.gauges.kv_cache_usage >= kv_cache_usage:
            return 0.0
        g = self.gauges
        # Other clients' requests (other workers, pods), as of the read. Ours are counted
        # here and now: one that just ended (or just left) can be in the gauges and not
        # in our count (or the other way round), so theirs are never fewer than none.
        others = max(0.0, g.running + g.waiting - self.in_flight_at_gauges)
        return max(0.0, self.capacity() + queue_allowance - (self.in_flight + others))

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.index, self.in_flight, self.gauges.waiting, self.gauges.running)


class ReplicaPool:
    def __init__(
        self,
        clients: Sequence[EngineClient],
        policy: RoutingPolicy,
        *,
        model: str | None = None,
        probe_interval_s: float = 1.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
        stalled_since: Callable[[float], bool] = lambda started: False,
        queue_allowance: float = DEFAULT_QUEUE_ALLOWANCE,
        saturation_kv: float = DEFAULT_SATURATION_KV,
    ) -> None:
        # Empty only while DNS discovery has found none yet (not ready meanwhile).
        self.replicas = [Replica(i, c) for i, c in enumerate(clients)]
        self._ids = itertools.count(len(self.replicas))
        self.policy = policy
        self.probe_interval_s = probe_interval_s
        self.max_attempts = max_attempts
        self._clock = clock
        self._model = self._configured_model = model
        self._monitor: asyncio.Task[None] | None = None
        self.metrics = metrics
        self._stalled_since = stalled_since
        self.queue_allowance = queue_allowance
        self.saturation_kv = saturation_kv
        # Called after each replica's gauges are read (admission lets waiters in then).
        self.on_gauges: Callable[[], None] = lambda: None
        # Called with `members()` when discovery changes it (the admission's cap follows).
        self.on_replica_count: Callable[[int], None] = lambda count: None
        self._members_told = len(self.replicas)
        self._gauges_wanted = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def room(self, admitted: int = 0) -> float:
        """Requests the healthy replicas take now before one would queue inside an engine
        (where the gateway's priorities and 429s no longer reach it), less those of the
        `admitted` requests not sent yet; inf where no gauge limits it, or with no healthy
        replica (that is the pool's 503 to give, not a queue to wait in). At 0 the gauges
        are read again soon, to let waiters in sooner."""
        healthy = [r for r in self.replicas if r.healthy and not r.leaving]
        if not healthy:
            return math.inf
        on_their_way = max(0, admitted - sum(r.in_flight for r in self.replicas))
        room = max(0.0, sum(r.room(self.queue_allowance, self.saturation_kv) for r in healthy) - on_their_way)
        if room < 1:
            self._gauges_wanted.set()
        return room

    def saturated(self) -> bool:
        return self.room() < 1

    def _excused(self, exc: UpstreamError, started: float) -> bool:
        """A failure a busy engine can cause too, while our own process stood still."""
        return isinstance(exc, EngineFlaky) and self._stalled_since(started)

    # -- health --------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every replica once (so readiness is right from the start), then monitor."""
        await self.probe_all()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="replica-monitor")
        self._reader = asyncio.create_task(self._read_while_saturated(), name="replica-gauges")

    async def close(self) -> None:
        for task in (self._monitor, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _read_while_saturated(self) -> None:
        """Gauges only (a health probe more often would count a busy engine's slow answers
        towards its ejection), at most every SATURATED_READ_GAP_S, while admission asks."""
        while True:
            await self._gauges_wanted.wait()
            self._gauges_wanted.clear()
            try:
                await asyncio.gather(*(self._read_gauges(r) for r in self.replicas if r.healthy and not r.leaving))
            except Exception:  # the reader must outlive any surprise
                log.exception("reading replica gauges failed")
            await asyncio.sleep(SATURATED_READ_GAP_S)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe_all()
            except Exception:  # the monitor must outlive any surprise
                log.exception("replica probe round failed")

    async def probe_all(self) -> None:
        now = self._clock()
        due = [r for r in self.replicas if not r.leaving and (r.healthy or now >= r.probe_after)]
        await asyncio.gather(*(self._probe(r) for r in due))

    # -- membership ----------------------------------------------------------------

    def members(self) -> int:
        """Replicas the pool routes to or will again (not those leaving)."""
        return sum(not r.leaving for r in self.replicas)

    async def sync(self, urls: set[str], make_client: Callable[[str], EngineClient]) -> None:
        """Make the discovered replicas those at `urls` (configured ones stay): a new one
        is probed at once, so it takes requests as soon as it is healthy; one no longer
        listed takes no new request and is dropped once its last request has ended."""
        known = {r.url: r for r in self.replicas}
        joined = []
        for url in sorted(urls - known.keys()):
            replica = Replica(next(self._ids), make_client(url), discovered=True, healthy=False)
            self.replicas.append(replica)
            joined.append(replica)
            log.info("replica %s joined (DNS)", url)
        for url in urls & known.keys():
            if known[url].leaving:
                known[url].leaving = False
                log.info("replica %s is back in DNS", url)
        for replica in list(self.replicas):  # idle ones are removed on the way
            if replica.discovered and not replica.leaving and replica.url not in urls:
                replica.leaving = True
                log.info("replica %s left DNS: no new requests; %d in flight finish there",
                         replica.url, replica.in_flight)
                self._drop_if_idle(replica)
        await asyncio.gather(*(self._probe(r) for r in joined))
        if self.members() != self._members_told:
            self._members_told = self.members()
            self.on_replica_count(self._members_told)

    def _drop_if_idle(self, replica: Replica) -> None:
        if not (replica.leaving and replica.in_flight == 0) or replica not in self.replicas:
            return
        self.replicas.remove(replica)
        if self.metrics is not None:
            self.metrics.forget_replica(replica.url)

    async def _probe(self, replica: Replica) -> None:
        started = self._clock()
        try:
            await replica.client.health()
        except UpstreamError as exc:
            if self._excused(exc, started):
                return
            # Refused, or 503 from /health: down. A dropped or slow probe: maybe just busy.
            down = isinstance(exc, UpstreamUnavailable) and not isinstance(exc, EngineFlaky)
            self.failed(replica, exc, definitive=down)
            return
        if not replica.healthy:
            log.info("replica %s is healthy again; re-admitted", replica.url)
        replica.healthy, replica.failures, replica.eject_s = True, 0, MIN_EJECT_S
        await self._read_gauges(replica)

    async def _read_gauges(self, replica: Replica) -> None:
        # The engine renders its gauges at some moment of the read, which can take seconds on
        # a busy box: ours are counted as the most we had at it meanwhile, so that other
        # clients' requests (the gauges less ours) are never overestimated, which would hold
        # our requests back from seats that are free.
        peak = [replica.in_flight]
        replica.read_peaks.append(peak)
        try:
            text = await replica.client.metrics_text()
            replica.read_gauges(parse_engine_gauges(text), peak[0])
        except (UpstreamError, ValueError) as exc:
            if replica.gauges_readable:
                log.warning("could not read queue gauges of %s (routing goes on without them): %s",
                            replica.url, str(exc)[:300])
            replica.gauges, replica.gauges_readable = EngineGauges(), False  # stale ones would mislead routing
        else:
            if not replica.gauges_readable:
                log.info("queue gauges of %s are readable again", replica.url)
            replica.gauges_readable = True
        finally:
            replica.read_peaks.remove(peak)
        self._export(replica)
        self.on_gauges()

    def _export(self, replica: Replica) -> None:
        if self.metrics is None:
            return
        m, url = self.metrics, replica.url
        m.replica_healthy.labels(url).set(1 if replica.healthy else 0)
        m.replica_in_flight.labels(url).set(replica.in_flight)
        m.replica_waiting.labels(url).set(replica.gauges.waiting)
        m.replica_running.labels(url).set(replica.gauges.running)
        m.replica_kv_usage.labels(url).set(replica.gauges.kv_cache_usage)

    def _count_in_flight(self, replica: Replica, change: int) -> None:
        # Exported as it changes: a probe round can take seconds while the engine is busy.
        replica.in_flight += change
        for peak in replica.read_peaks:
            peak[0] = max(peak[0], replica.in_flight)
        if replica.leaving:
            self._drop_if_idle(replica)
        elif self.metrics is not None:
            self.metrics.replica_in_flight.labels(replica.url).set(replica.in_flight)

    def failed(self, replica: Replica, exc: Exception, *, definitive: bool) -> None:
        """Count a failure; eject on a definitive one or after enough in a row."""
        replica.failures += 1
        if not (definitive or replica.failures >= FAILURES_TO_EJECT):
            return
        if replica.healthy:
            log.warning("replica %s ejected: %s", replica.url, exc)
        else:  # still failing while ejected: wait longer before the next probe
            replica.eject_s = min(replica.eject_s * 2, MAX_EJECT_S)
        replica.healthy = False
        replica.probe_after = self._clock() + replica.eject_s
        self._export(replica)

    def ready(self) -> bool:
        return any(r.healthy and not r.leaving for r in self.replicas)

    # -- requests ------------------------------------------------------------------

    def _pick(self, tried: set[int]) -> Replica | None:
        routable = {r.index: r for r in self.replicas if r.healthy and not r.leaving and r.index not in tried}
        if not routable:
            return None
        return routable[self.policy.pick([r.load() for r in routable.values()]).index]

    @asynccontextmanager
    async def lease(self, op: Callable[[EngineClient], Awaitable[T]]) -> AsyncIterator[T]:
        """Run `op` on a replica, retrying elsewhere while it is unreachable.

        The replica counts the request in flight until the block exits, so a relayed
        stream keeps its replica busy for as long as it lasts.
        """
        tried: set[int] = set()
        flaky: set[int] = set()  # tried, but failed the way a busy engine can fail too
        last: UpstreamError | None = None
        attempts = excused = 0
        while attempts < self.max_attempts:
            # An untried replica first; else one that only failed flakily deserves another
            # try on a fresh connection (with one replica, that is the only way to retry).
            replica = self._pick(tried) or self._pick(tried - flaky)
            if replica is None:
                break
            if attempts or excused:
                if self.metrics is not None:
                    self.metrics.upstream_retries.inc()
                await asyncio.sleep(random.uniform(0, RETRY_PAUSE_S * 2 ** max(attempts - 1, 0)))
            tried.add(replica.index)
            self._count_in_flight(replica, +1)
            started = self._clock()
            try:
                try:
                    # One span per attempt: the replica, and the engine's own span under it.
                    with TRACER.start_as_current_span("engine attempt", kind=SpanKind.CLIENT, attributes={
                            **server_attributes(replica.url), "scanner.attempt": attempts + excused + 1}):
                        result = await op(replica.client)
                except UpstreamUnavailable as exc:
                    last = exc
                    if excused < self.max_attempts and self._excused(exc, started):
                        excused += 1
                        flaky.add(replica.index)
                        log.debug("%s while the gateway itself stood still: retried, not held against %s",
                                  exc, replica.url)
                        continue
                    attempts += 1
                    self.failed(replica, exc, definitive=isinstance(exc, EngineUnreachable))
                    if isinstance(exc, EngineFlaky):
                        flaky.add(replica.index)
                    else:  # it answered 503 or refused: not worth another try
                        flaky.discard(replica.index)
                    continue
                replica.failures = 0
                yield result
                return
            finally:
                self._count_in_flight(replica, -1)
        if last is None:
            raise UpstreamUnavailable("no healthy engine replica; try again shortly")
        raise last

    async def call(self, op: Callable[[EngineClient], Awaitable[T]]) -> T:
        async with self.lease(op) as result:
            return result

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion:
        try:
            return await self.call(lambda client: client.chat(payload))
        except ModelNotServed:
            if self._configured_model is not None:
                raise
            # The engines were restarted with another model (a rolling upgrade): find out
            # which, once, instead of failing every scan until the gateway restarts.
            stale = payload.get("model")
            forgotten = self._model == stale  # the first request to find out forgets the old name
            if forgotten:
                self._model = None
            model = await self.model_name()
            if model == stale:
                raise
            if forgotten:
                log.warning("the engines now serve %r instead of %r; using it", model, stale)
            renamed = {**payload, "model": model}
            return await self.call(lambda client: client.chat(renamed))

    async def list_models(self) -> list[ModelCard]:
        return await self.call(lambda client: client.list_models())

    async def model_name(self) -> str:
        """The configured model, else the engine's first served model (cached once found)."""
        if self._model is None:
            models = await self.list_models()
            if not models:
                raise EngineError("the engine serves no models")
            self._model = models[0].id
        return self._model

    @asynccontextmanager
    async def stream(self, path: str, body: bytes, content_type: str) -> AsyncIterator[tuple[EngineClient, aiohttp.ClientResponse]]:
        """POST `body` to a replica and hold its not-yet-read response open; closed on exit."""

        async def open_(client: EngineClient) -> tuple[EngineClient, aiohttp.ClientResponse]:
            return client, await client.open_stream(path, body, content_type)

        async with self.lease(open_) as (client, response):
            try:
                yield client, response
            finally:
                # A fully read answer frees its connection for reuse; anything else closes
                # it, which is how vLLM learns to abort the request.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()


"""The batch worker each gateway process runs: claims items, sends each through the
gateway's own request path at the `batch` priority class, stores the answers, and
writes a finished batch's output and error files.

Its share of the engines is bounded twice: at most `max_in_flight` items of this
process run at once, and each waits for its admission slot behind every interactive
request (a 429 puts the item back to wait, it never fails it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scanner_gateway.batches.file_storage import FileStorage
from scanner_gateway.batches.input_lines import BatchRequest, check_request
from scanner_gateway.batches.objects import FileObject
from scanner_gateway.batches.store import BatchStore, ClaimedItem, ItemOutcome

if TYPE_CHECKING:
    from scanner_gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)
RETRIED_STATUSES = frozenset({502, 503, 504})  # the engine's trouble, maybe passing: tried again, up to max_attempts
OUTPUT_PAGE = 500
COUNTS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Answer:
    status_code: int
    request_id: str | None
    body: str  # JSON text
    retry_after_s: float | None = None


Dispatch = Callable[[str, BatchRequest], Awaitable[Answer]]  # (owner, request) -> the answer


@dataclass(frozen=True)
class RunnerSettings:
    max_in_flight: int = 4
    lease_s: float = 60.0
    poll_s: float = 1.0
    max_attempts: int = 3
    retry_backoff_s: float = 2.0


class BatchRunner:
    def __init__(self, store: BatchStore, storage: FileStorage, dispatch: Dispatch, settings: RunnerSettings,
                 *, metrics: GatewayMetrics | None = None, wake: asyncio.Event | None = None,
                 clock: Callable[[], float] = time.time, stopping: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.storage = storage
        self.dispatch = dispatch
        self.settings = settings
        self.metrics = metrics
        self.worker = f"worker-{uuid.uuid4().hex[:12]}"
        self.wake = wake or asyncio.Event()
        self.clock = clock
        self.stopping = stopping  # true once the gateway drains: start nothing more
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._stored = asyncio.Event()  # an item was stored: its batch may be finished now
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="batch-claims"),
            asyncio.create_task(self._upkeep_loop(), name="batch-upkeep"),
        ]

    async def stop(self) -> None:
        """Stop claiming; give back the items running here so another worker (or this
        gateway, started again) takes them at once instead of after their lease."""
        for task in self._tasks:
            task.cancel()
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *running, return_exceptions=True)

    async def _claim_loop(self) -> None:
        while True:
            # Cleared before claiming: an item that ends from here on wakes the wait below.
            self._slot_free.clear()
            self.wake.clear()
            try:
                free = 0 if self.stopping() else self.settings.max_in_flight - len(self._running)
                items = await self.store.claim(self.worker, free, self.clock(), self.settings.lease_s) if free else []
            except Exception:
                log.exception("batch worker: claiming items failed; trying again")
                items = []
            for item in items:
                key = (item.batch_id, item.line_no)
                self._running[key] = asyncio.create_task(self._run(item), name=f"batch-item-{item.line_no}")
            if items and len(self._running) < self.settings.max_in_flight:
                continue  # more may be waiting
            # Wait for a free slot, a new batch in this process, or the next poll (other processes' batches).
            waits = [asyncio.ensure_future(self.wake.wait())]
            if self._running:
                waits.append(asyncio.ensure_future(self._slot_free.wait()))
            _, pending = await asyncio.wait(waits, timeout=self.settings.poll_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()

    async def _run(self, item: ClaimedItem) -> None:
        key = (item.batch_id, item.line_no)
        try:
            outcome = await self._outcome(item)
            if outcome is None:
                return
            if await self.store.finish(item, self.worker, outcome):
                self._count(outcome.state)
                self._stored.set()
            else:
                log.warning("batch %s line %d: lease lost before the answer was stored; another worker has it",
                            item.batch_id, item.line_no)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # stopping: hand it back, best effort (else its lease runs out)
                await asyncio.shield(self.store.release(item, self.worker, count_attempt=False))
            raise
        except Exception:
            log.exception("batch %s line %d: failed in the worker; it will be tried again", item.batch_id, item.line_no)
            with contextlib.suppress(Exception):
                await self.store.release(item, self.worker, count_attempt=True)
        finally:
            self._running.pop(key, None)
            self._slot_free.set()

    async def _outcome(self, item: ClaimedItem) -> ItemOutcome | None:
        """The item's outcome to store, or None when it went back to wait."""
        if item.attempts > self.settings.max_attempts:
            return ItemOutcome(error_code="attempts_exhausted",
                               error_message=f"the request was started {item.attempts - 1} times without an answer")
        line = await self.storage.read_range(item.input_file_id, item.byte_offset, item.byte_length)
        try:
            request = check_request(line.strip(), item.endpoint)
        except ValueError as exc:  # checked at creation; only a changed file gets here
            return ItemOutcome(error_code="invalid_request", error_message=str(exc))
        answer = await self.dispatch(item.owner, request)
        if answer.status_code == 429:
            # Overloaded: wait as told, holding this worker slot (fewer claims meanwhile).
            await self.store.release(item, self.worker, count_attempt=False)
            self._count("deferred")
            await asyncio.sleep(answer.retry_after_s or self.settings.retry_backoff_s)
            return None
        if answer.status_code in RETRIED_STATUSES and item.attempts < self.settings.max_attempts:
            await self.store.release(item, self.worker, count_attempt=True)
            self._count("retried")
            await asyncio.sleep(self.settings.retry_backoff_s * item.attempts)
            return None
        return ItemOutcome(status_code=answer.status_code, request_id=answer.request_id, response_body=answer.body)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.batch_items.labels(outcome).inc()

    async def _upkeep_loop(self) -> None:
        last_counts = 0.0
        last_renewal = self.clock()
        last_upkeep = self.clock()
        while True:
            # Each poll, and as soon as this process stored an answer with nothing else running
            # (its batch's last item, maybe: its files are written at once, not a poll later).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stored.wait(), self.settings.poll_s)
            self._stored.clear()
            if self._running and self.clock() - last_upkeep < self.settings.poll_s:
                continue
            last_upkeep = self.clock()
            try:
                now = self.clock()
                if now - last_renewal >= self.settings.lease_s / 3:
                    await self.store.renew(self.worker, now + self.settings.lease_s)
                    last_renewal = now
                await self.store.close_out(now)
                for batch_id in await self.store.finishable():
                    await self._finalize(batch_id)
                if self.metrics is not None and now - last_counts >= COUNTS_INTERVAL_S:
                    counts = await self.store.item_counts()
                    for state in ("pending", "running", "done", "failed"):
                        self.metrics.batch_item_states.labels(state).set(counts.get(state, 0))
                    last_counts = now
            except Exception:
                log.exception("batch worker: upkeep failed; trying again")

    async def _finalize(self, batch_id: str) -> None:
        now = self.clock()
        row = await self.store.claim_finalizing(batch_id, self.worker, now, self.settings.lease_s)
        if row is None:
            return  # another worker has it
        if row["status"] == "cancelling":
            status = "cancelled"
        elif await self.store.has_expired_items(batch_id):
            status = "expired"
        else:
            status = "completed"
        output = await self._write(batch_id, "output", ok=True)
        errors = await self._write(batch_id, "error", ok=False)
        if await self.store.finalize(batch_id, self.worker, status, int(self.clock()), row["owner"], output, errors):
            log.info("batch %s %s", batch_id, status)

    async def _write(self, batch_id: str, kind: str, *, ok: bool) -> FileObject | None:
        """The output (ok) or error file of a batch, in line order; None when it would be empty."""
        lines = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal lines
            after = 0
            while page := await self.store.item_page(batch_id, after, OUTPUT_PAGE):
                after = page[-1]["line_no"]
                rows = [row for row in page if (row["state"] == "done") == ok]
                lines += len(rows)
                if rows:
                    yield b"".join(output_line(batch_id, row) for row in rows)

        file_id = f"file-{batch_id.removeprefix('batch_')}-{kind}"
        size = await self.storage.write(file_id, chunks())
        if not lines:
            await self.storage.delete(file_id)
            return None
        return FileObject(id=file_id, bytes=size, created_at=int(self.clock()),
                          filename=f"{batch_id}_{kind}.jsonl", purpose="batch_output")


def output_line(batch_id: str, row: dict) -> bytes:
    """One line of an output or error file, as OpenAI writes them: the answer whatever its
    status, or the error that kept the request from being sent."""
    head = {"id": f"batch_req_{batch_id.removeprefix('batch_')}_{row['line_no']}", "custom_id": row["custom_id"]}
    if row["status_code"] is None:
        head.update(response=None, error={"code": row["error_code"], "message": row["error_message"]})
        return json.dumps(head, ensure_ascii=False).encode() + b"\n"
    response = json.dumps({"status_code": row["status_code"], "request_id": row["request_id"]})
    # The stored body is JSON already: spliced in, not parsed and written again.
    return (json.dumps(head, ensure_ascii=False)[:-1] + f', "response": {response[:-1]}, "body": '
            f'{row["response_body"]}}}, "error": null}}\n').encode()

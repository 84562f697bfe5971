"""Idempotency-Key for scans: a repeated request returns the first result instead of
scanning twice (store networks drop connections, and clients retry).

- A key seen within `ttl_s` returns that request's result, or joins it while it runs.
- The same key with a different request (task, locale or photos) is refused (422).
- Failures are not kept: a retry after an error scans again.
- Memory is bounded: at most `max_entries` keys, the oldest dropped first. Results live
  in this process only; with several workers or gateways, route a client consistently
  (or accept that a retry landing elsewhere scans again).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from scanner_gateway.errors import IdempotencyKeyReused, InvalidRequest

T = TypeVar("T")
DEFAULT_TTL_S = 600.0
DEFAULT_MAX_ENTRIES = 10_000
MAX_KEY_LENGTH = 255


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters", param="Idempotency-Key"
        )
    return key


def request_fingerprint(task: str, locale: str, images: Sequence[bytes | str]) -> str:
    digest = hashlib.sha256(f"{task}\0{locale}\0{len(images)}".encode())
    for image in images:
        digest.update(hashlib.sha256(image if isinstance(image, bytes) else image.encode()).digest())
    return digest.hexdigest()


@dataclass
class _Entry(Generic[T]):
    fingerprint: str
    task: asyncio.Future[T]
    expires: float


class IdempotencyCache:
    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        now = self._clock()
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if oldest.expires > now and len(self._entries) <= self.max_entries:
                break
            del self._entries[key]

    async def run(self, key: str, fingerprint: str, work: Callable[[], Awaitable[T]]) -> T:
        self._evict()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used for a different request; use a new key",
                    param="Idempotency-Key",
                )
            return await asyncio.shield(entry.task)
        # Its own task, so a client that hangs up does not cancel it for the ones that retry.
        task: asyncio.Future[T] = asyncio.ensure_future(work())
        entry = _Entry(fingerprint, task, self._clock() + self.ttl_s)
        self._entries[key] = entry
        self._evict()

        def forget_failures(done: asyncio.Future[T]) -> None:
            if (done.cancelled() or done.exception() is not None) and self._entries.get(key) is entry:
                del self._entries[key]

        task.add_done_callback(forget_failures)
        return await asyncio.shield(task)

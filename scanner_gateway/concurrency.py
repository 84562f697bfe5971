"""asyncio helpers shared by the scan service and the relay (no web framework, no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def all_or_first_error(work: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, or the first error once all have ended (none is left running)."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    return results  # type: ignore[return-value]

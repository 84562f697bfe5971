"""Routing policies: pick one replica out of the routable ones. Pure: no I/O, no clocks.

A policy sees immutable snapshots (`ReplicaLoad`) and answers an index, so it can be
tested exhaustively and swapped by configuration (`SCANNER_ROUTING`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

PolicyName = Literal["least_loaded", "round_robin"]


@dataclass(frozen=True)
class ReplicaLoad:
    index: int  # position in the pool
    in_flight: int  # requests this gateway process has open on the replica
    engine_waiting: float  # the engine's own queue (vllm:num_requests_waiting), last scrape
    engine_running: float


class RoutingPolicy(Protocol):
    def pick(self, candidates: Sequence[ReplicaLoad]) -> ReplicaLoad:
        """`candidates` is never empty."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[ReplicaLoad]) -> ReplicaLoad:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded:
    """Fewest requests in flight from us plus waiting in the engine's queue.

    Our own in-flight count reacts instantly; the engine's waiting gauge adds the load
    other gateway workers put there. Ties rotate, so equal replicas share the traffic.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[ReplicaLoad]) -> ReplicaLoad:
        def load(r: ReplicaLoad) -> float:
            return r.in_flight + r.engine_waiting

        best = min(load(r) for r in candidates)
        tied = [r for r in candidates if load(r) == best]
        return tied[next(self._counter) % len(tied)]


def build_policy(name: PolicyName) -> RoutingPolicy:
    return {"least_loaded": LeastLoaded, "round_robin": RoundRobin}[name]()

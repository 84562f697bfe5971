"""Read the engine's queue gauges out of its Prometheus /metrics text (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
_GAUGES = (RUNNING, WAITING, KV_CACHE_USAGE)
# A sample line of one of our three gauges: its name, its labels (skipped), its value.
_SAMPLE = re.compile(rf"^({'|'.join(map(re.escape, _GAUGES))})(?:\{{[^\n]*\}})?[ \t]+(\S+)", re.M)
# What the first line of any exposition text looks like: a comment or a metric name.
_EXPOSITION_START = re.compile(r"\s*(?:#|[a-zA-Z_:][a-zA-Z0-9_:]*[ {])")


@dataclass(frozen=True)
class EngineGauges:
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1


def parse_engine_gauges(text: str) -> EngineGauges:
    """Sum each gauge over its label sets (one per model/engine core). Missing -> 0.

    Only our three gauges' sample lines are read: vLLM's whole page (~600 lines of
    histograms) through a full Prometheus parser cost ~8 ms of the event loop per probe,
    ~30 ms on a busy box, every second. Raises ValueError on text that is not Prometheus
    exposition format, or a value that is not a number.
    """
    if text.strip() and not _EXPOSITION_START.match(text):
        raise ValueError(f"not Prometheus text: {text[:80]!r}")
    totals = dict.fromkeys(_GAUGES, 0.0)
    kv_series = 0
    for name, value in _SAMPLE.findall(text):
        totals[name] += float(value)
        kv_series += name == KV_CACHE_USAGE
    return EngineGauges(
        running=totals[RUNNING],
        waiting=totals[WAITING],
        # Usage is a fraction per engine core: average, not sum.
        kv_cache_usage=totals[KV_CACHE_USAGE] / kv_series if kv_series else 0.0,
    )

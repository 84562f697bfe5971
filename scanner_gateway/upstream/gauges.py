"""Read the engine's queue gauges out of its Prometheus /metrics text (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"


@dataclass(frozen=True)
class EngineGauges:
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1


def parse_engine_gauges(text: str) -> EngineGauges:
    """Sum each gauge over its label sets (one per model/engine core). Missing -> 0.

    Raises ValueError on text that is not Prometheus exposition format.
    """
    totals = {RUNNING: 0.0, WAITING: 0.0, KV_CACHE_USAGE: 0.0}
    kv_series = 0
    for family in text_string_to_metric_families(text):
        if family.name not in totals:
            continue
        for sample in family.samples:
            if sample.name == family.name:
                totals[family.name] += sample.value
                kv_series += family.name == KV_CACHE_USAGE
    return EngineGauges(
        running=totals[RUNNING],
        waiting=totals[WAITING],
        # Usage is a fraction per engine core: average, not sum.
        kv_cache_usage=totals[KV_CACHE_USAGE] / kv_series if kv_series else 0.0,
    )

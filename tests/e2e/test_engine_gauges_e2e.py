"""The engine gauges least-loaded routing depends on, read from a real vLLM's /metrics:
a renamed gauge would read 0 for ever and the router would quietly stop seeing load."""

from __future__ import annotations

import re

import httpx
import pytest

from scanner_gateway.upstream.gauges import (
    KV_CACHE_USAGE,
    RUNNING,
    WAITING,
    EngineGauges,
    parse_engine_gauges,
)
from tests.e2e.engine_watch import METRICS_TIMEOUT_S, engine_held, gateway_metric, wait_until

pytestmark = pytest.mark.e2e


def test_the_engine_exports_every_gauge_the_router_reads(engine):
    text = httpx.get(f"{engine.base_url}/metrics", timeout=METRICS_TIMEOUT_S).text
    for name in (RUNNING, WAITING, KV_CACHE_USAGE):
        assert re.search(rf"^{re.escape(name)}\{{[^}}]*\}} \S+$", text, re.M), f"vLLM no longer exports {name}"


def engine_gauges_if_running(engine_url: str) -> EngineGauges | None:
    gauges = parse_engine_gauges(httpx.get(f"{engine_url}/metrics", timeout=METRICS_TIMEOUT_S).text)
    return gauges if gauges.running else None


def test_the_gateway_sees_the_engine_work(gateway_with, engine):
    with gateway_with(probe_interval_s=0.2) as url:
        with engine_held(url, engine.base_url):
            # vLLM updates its gauges as it goes and may answer /metrics late: poll.
            gauges = wait_until(lambda: engine_gauges_if_running(engine.base_url), "vLLM reports the request")
            assert gauges.running == 1 and gauges.waiting == 0 and 0 < gauges.kv_cache_usage < 1
            # The replica's gauges on the gateway's own /metrics, as the router reads them.
            wait_until(lambda: gateway_metric(url, "scanner_replica_engine_running") == 1, "running seen")
            wait_until(lambda: gateway_metric(url, "scanner_replica_engine_kv_cache_usage_ratio") > 0, "KV seen")
        wait_until(lambda: gateway_metric(url, "scanner_replica_engine_running") == 0, "the engine idle again")

from collections import Counter

import pytest

from scanner_gateway.upstream.gauges import EngineGauges, parse_engine_gauges
from scanner_gateway.upstream.routing import LeastLoaded, ReplicaLoad, RoundRobin, build_policy

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="scanner-dev"} 3.0
vllm:num_requests_running{engine="1",model_name="scanner-dev"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="scanner-dev"} 7.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="scanner-dev",reason="capacity"} 99.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="scanner-dev"} 2.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="scanner-dev"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="scanner-dev"} 5.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="scanner-dev"} 3.5
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="scanner-dev"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="scanner-dev"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="scanner-dev"} 12345.0
"""


def test_gauges_sum_over_engines_and_average_kv_usage():
    assert parse_engine_gauges(VLLM_METRICS) == EngineGauges(running=4.0, waiting=7.0, kv_cache_usage=0.375)


def test_missing_gauges_read_as_zero():
    assert parse_engine_gauges("# TYPE other gauge\nother 1\n") == EngineGauges()


@pytest.mark.parametrize("garbage", [
    "<html>not metrics</html>\n{{{",
    '{"object": "chat.completion"}',  # a server that answers everything with JSON
    'vllm:num_requests_waiting{engine="0"} many\n',
])
def test_garbage_metrics_raise_value_error(garbage):
    with pytest.raises(ValueError):
        parse_engine_gauges(garbage)


def loads(*pairs: tuple[int, float]) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, in_flight, waiting, 0) for i, (in_flight, waiting) in enumerate(pairs)]


def test_least_loaded_counts_our_in_flight_plus_the_engine_queue():
    policy = LeastLoaded()
    assert policy.pick(loads((5, 0), (1, 2), (0, 9))).index == 1
    assert policy.pick(loads((0, 3), (2, 0))).index == 1


def test_least_loaded_rotates_between_equal_replicas():
    policy = LeastLoaded()
    picks = Counter(policy.pick(loads((1, 0), (9, 9), (1, 0))).index for _ in range(100))
    assert picks == {0: 50, 2: 50}


def test_round_robin_ignores_load():
    policy = RoundRobin()
    assert [policy.pick(loads((0, 0), (99, 99), (0, 0))).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_build_policy_by_name():
    assert isinstance(build_policy("round_robin"), RoundRobin)
    assert isinstance(build_policy("least_loaded"), LeastLoaded)


@pytest.mark.parametrize(("body", "maybe"), [
    (b'{"model": "scan/price_tags", "messages": []}', True),
    (b'{"messages": [], "model": "scan\\/price_tags"}', True),  # PHP's json_encode escapes "/"
    (b'{"model": "ostrakon-vl", "messages": [{"content": "please scan/check"}]}', False),
    (b'{"model": "ostrakon-vl", "messages": [{"content": "scan/x"}]}', True),  # a false alarm is fine: slow path
    (b'{"model": "m", "image": "' + b"A" * 100_000 + b'"}', False),
    (b"", False),
])
def test_scan_model_precheck(body, maybe):
    from scanner_gateway.upstream.relay_body import may_name_scan_model

    assert may_name_scan_model(body) is maybe


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"model": "m"}', {"priority": 7, "model": "m"}),
    (b'  {"model": "m", "priority": 1}', {"priority": 1, "model": "m"}),  # last duplicate wins
    (b"{}", {"priority": 7}),
    (b"{ }", {"priority": 7}),
    (b"{\r\n\t}", {"priority": 7}),
    (b'{\n  "model": "m"\n}', {"priority": 7, "model": "m"}),
])
def test_with_priority_prepends_a_member(body, expected):
    import json

    from scanner_gateway.upstream.relay_body import with_priority

    assert json.loads(with_priority(body, 7)) == expected


def test_with_priority_leaves_non_objects_alone():
    from scanner_gateway.upstream.relay_body import with_priority

    assert with_priority(b"[1]", 7) == b"[1]" and with_priority(b"", 7) == b""

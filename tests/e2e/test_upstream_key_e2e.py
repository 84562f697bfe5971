"""SCANNER_UPSTREAM_API_KEY against a real `vllm serve --api-key` (a second engine, for
this module only)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME, ManagedEngine
from tests.e2e.conftest import dev_engine
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e
ENGINE_KEY = "engine-only-key-7f3a"
CHAT = {"model": DEV_SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed_engine(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedEngine]:
    with dev_engine(dev_model_dir, tmp_path_factory.mktemp("keyed") / "vllm.log", api_key=ENGINE_KEY) as engine:
        yield engine


def scan(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/scan", files={"image": ("shelf.jpg", shelf_jpeg(320, 240, seed=81), "image/jpeg")},
                      data={"task": "storefront"}, timeout=300)


def test_the_engine_refuses_anyone_without_its_key(keyed_engine):
    r = httpx.post(f"{keyed_engine.base_url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 401


def test_the_gateway_with_the_engines_key_scans_and_relays(keyed_engine, gateway_with):
    with gateway_with(upstream_url=keyed_engine.base_url, upstream_api_key=ENGINE_KEY) as url:
        assert scan(url).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        # The client's own Authorization is not what reaches the engine.
        relayed = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60,
                             headers={"Authorization": "Bearer some-client-key"})
        assert relayed.status_code == 200


@pytest.mark.parametrize("upstream_api_key", [None, "not-the-engines-key"])
def test_a_gateway_without_the_right_key_says_so_as_a_502(keyed_engine, gateway_with, upstream_api_key):
    with gateway_with(upstream_url=keyed_engine.base_url, upstream_api_key=upstream_api_key,
                      model=DEV_SERVED_NAME) as url:
        for r in (scan(url), httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)):
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["code"] == "engine_auth_failed" and "SCANNER_UPSTREAM_API_KEY" in error["message"]

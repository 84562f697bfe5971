"""Image URLs in scans: fetched only from allowed hosts, redirects re-checked, bodies
capped, fetch failures a clear 4xx. The image host is a real HTTP server on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from tests.api.test_scan_api import assert_error
from tests.helpers import serve_in_thread, shelf_jpeg

PHOTO = shelf_jpeg(800, 600)
LIMIT = 2 * 1024 * 1024  # the api tests' max_image_bytes


def image_host() -> FastAPI:
    app = FastAPI()

    @app.get("/photo.jpg")
    async def photo() -> Response:
        return Response(PHOTO, media_type="image/jpeg")

    @app.get("/hop/{n}")
    async def hop(n: int) -> RedirectResponse:
        return RedirectResponse("/photo.jpg" if n == 0 else f"/hop/{n - 1}", status_code=302)

    @app.get("/to")
    async def to(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=302)

    @app.get("/missing.jpg")
    async def missing() -> Response:
        return Response(b"no such key", status_code=404)

    @app.get("/slow.jpg")
    async def slow() -> Response:
        await asyncio.sleep(5)
        return Response(PHOTO, media_type="image/jpeg")

    @app.get("/unsized")
    async def unsized() -> StreamingResponse:  # no content-length: the cap must hold while streaming
        async def chunks():
            for _ in range(2 * LIMIT // 65536):
                yield b"\0" * 65536
        return StreamingResponse(chunks(), media_type="image/jpeg")

    return app


@pytest.fixture(scope="module")
def host_url() -> Iterator[str]:
    with serve_in_thread(image_host()) as url:
        yield url


@pytest.fixture
def url_client(settings, host_url) -> Iterator[TestClient]:
    update = {"image_url_hosts": "127.0.0.1, *.example.com", "image_fetch_timeout_s": 1.0}
    with TestClient(create_app(settings.model_copy(update=update)), raise_server_exceptions=False) as c:
        yield c


def test_allowed_host_is_fetched_for_scan_and_chat(url_client, host_url, fake_engine):
    r = url_client.post("/v1/scan", json={"task": "price_tags", "images": [f"{host_url}/photo.jpg"]})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0] == {**r.json()["images"][0], "width": 800, "height": 600, "bytes": len(PHOTO)}
    sent = fake_engine.payloads[-1]["messages"][1]["content"][0]["image_url"]["url"]
    assert sent.startswith("data:image/jpeg;base64,")  # the engine gets bytes, never the URL
    chat = url_client.post("/v1/chat/completions", json={"model": "scan/storefront", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{host_url}/hop/2"}}]}]})
    assert chat.status_code == 200, chat.text  # redirects within allowed hosts are followed


@pytest.mark.parametrize(("path", "status", "code", "words"), [
    ("/missing.jpg", 400, "image_fetch_failed", "answered HTTP 404"),
    ("/slow.jpg", 400, "image_fetch_failed", "did not answer within 1 s"),
    ("/unsized", 413, "image_too_large", "more than the limit"),
    ("/hop/5", 400, "image_fetch_failed", "redirected more than 3 times"),
    ("/to?url=http://localhost:1/photo.jpg", 400, "invalid_request", "host 'localhost'"),
])
def test_fetch_failures_are_clear_4xx(url_client, host_url, fake_engine, path, status, code, words):
    r = url_client.post("/v1/scan", json={"task": "price_tags", "images": [f"{host_url}{path}"]})
    error = assert_error(r, status, code)
    assert words in error["message"] and error["param"] == "image"
    assert fake_engine.payloads == []


def test_urls_are_refused_by_default_and_off_the_list(client, url_client, fake_engine):
    error = assert_error(client.post("/v1/scan", json={"task": "price_tags", "images": ["https://a.example.com/x.jpg"]}),
                         400, "invalid_request")
    assert "SCANNER_IMAGE_URL_HOSTS" in error["message"]
    secret = "https://bucket.internal/x.jpg?X-Amz-Signature=s3cr3t"
    error = assert_error(url_client.post("/v1/scan", json={"task": "price_tags", "images": [secret]}),
                         400, "invalid_request")
    assert "'bucket.internal'" in error["message"] and "s3cr3t" not in error["message"]
    assert fake_engine.payloads == []

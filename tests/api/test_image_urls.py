"""Image URLs in scans: fetched only from allowed hosts, redirects re-checked, bodies
capped, fetch failures a clear 4xx. The image host is a real HTTP server on a socket."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.scan.schema import sample_instance
from tests.api.test_scan_api import assert_error
from tests.fake_engine import completion
from tests.helpers import serve_in_thread, shelf_jpeg

PHOTO = shelf_jpeg(800, 600)
LIMIT = 2 * 1024 * 1024  # the api tests' max_image_bytes


SLOW_HOST_S = 1.5
host_hits: list[str] = []  # paths the image host was asked for


def image_host() -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def count(request, call_next):
        host_hits.append(request.url.path)
        return await call_next(request)

    @app.get("/photo.jpg")
    async def photo() -> Response:
        return Response(PHOTO, media_type="image/jpeg")

    @app.get("/slowish.jpg")
    async def slowish() -> Response:
        await asyncio.sleep(SLOW_HOST_S)
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


def scan_in_background(url: str, image: str | bytes, done: dict[str, float], name: str) -> threading.Thread:
    def run() -> None:
        if isinstance(image, bytes):
            r = httpx.post(f"{url}/v1/scan", files={"image": ("a.jpg", image)}, data={"task": "price_tags"},
                           timeout=30)
        else:
            r = httpx.post(f"{url}/v1/scan", json={"task": "price_tags", "images": [image]}, timeout=30)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "waited 10 s"
        time.sleep(0.01)


def start_slow_download(url: str, host_url: str, done: dict[str, float]) -> threading.Thread:
    """A scan of a photo on the slow image host, returned once its download has begun."""
    hits = host_hits.count("/slowish.jpg")
    thread = scan_in_background(url, f"{host_url}/slowish.jpg", done, "url")
    wait_until(lambda: host_hits.count("/slowish.jpg") > hits)
    return thread


def test_a_slow_image_host_holds_no_engine_slot(settings, host_url):
    # One engine slot: a photo still downloading must not keep the next scan waiting for it.
    update = {"image_url_hosts": "127.0.0.1", "max_in_flight_per_replica": 1}
    done: dict[str, float] = {}
    with serve_in_thread(create_app(settings.model_copy(update=update))) as url:
        slow = start_slow_download(url, host_url, done)
        uploaded = scan_in_background(url, PHOTO, done, "bytes")
        uploaded.join(timeout=30)
        slow.join(timeout=30)
    assert done["bytes"] < done["url"]


def test_an_overloaded_gateway_refuses_before_downloading(settings, host_url, fake_engine):
    fake_engine.answer = lambda payload: dataclasses.replace(
        completion(json.dumps(sample_instance(payload["response_format"]["json_schema"]["schema"]))), delay_s=1.0)
    update = {"image_url_hosts": "127.0.0.1", "max_in_flight_per_replica": 1, "queue_limit": 0}
    done: dict[str, float] = {}
    with serve_in_thread(create_app(settings.model_copy(update=update))) as url:
        busy = scan_in_background(url, PHOTO, done, "bytes")
        wait_until(lambda: bool(fake_engine.payloads))  # the one slot is taken
        hits = len(host_hits)
        r = httpx.post(f"{url}/v1/scan", json={"task": "price_tags", "images": [f"{host_url}/photo.jpg"]})
        busy.join(timeout=30)
    assert_error(r, 429, "overloaded")
    assert len(host_hits) == hits  # nothing was downloaded for a request refused anyway


def test_downloads_beyond_their_limit_get_429(settings, host_url):
    update = {"image_url_hosts": "127.0.0.1", "image_fetch_max_active": 1}
    done: dict[str, float] = {}
    with serve_in_thread(create_app(settings.model_copy(update=update))) as url:
        slow = start_slow_download(url, host_url, done)  # the one download allowed
        r = httpx.post(f"{url}/v1/scan", json={"task": "price_tags", "images": [f"{host_url}/photo.jpg"]})
        slow.join(timeout=30)
    error = assert_error(r, 429, "overloaded")
    assert "image URL downloads" in error["message"] and r.headers["retry-after"] == "1"

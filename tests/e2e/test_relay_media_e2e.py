"""The relay's open door, closed: image URLs that point into the operator's network reach
nothing, through any route, in front of the real engine.

A listener on loopback stands for the cloud metadata endpoint or an admin UI. Each
attack URL is first fetched by the test itself (so it surely reaches the listener),
then sent through chat, the Responses API and a `scan/<task>` model, and straight to
the engine (its own flags, in depth behind the gateway): the listener must see nothing.
An allowed host (127.0.0.2) still works, fetched once by the gateway.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, ManagedEngine
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(320, 240)
ALLOWED_HOST = "127.0.0.2"  # all of 127/8 is loopback on Linux: a second host with no setup


class Listener:
    """A real HTTP server on a loopback address that records every request it gets."""

    def __init__(self, host: str) -> None:
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits.append(self.path)
                if self.path.startswith("/to?"):
                    self.send_response(302)
                    self.send_header("location", self.path.split("?url=", 1)[1])
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "image/jpeg")
                self.send_header("content-length", str(len(PHOTO)))
                self.end_headers()
                self.wfile.write(PHOTO)

            def log_message(self, *args: object) -> None:
                pass

        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
        self.server = server_class((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[str, Listener]]:
    made = {"v4": Listener("127.0.0.1"), "v6": Listener("::1"), "allowed": Listener(ALLOWED_HOST)}
    yield made
    for listener in made.values():
        listener.close()


@pytest.fixture(scope="module")
def guarded(engine: ManagedEngine) -> Iterator[TestClient]:
    """The gateway in front of the session engine, fetching from ALLOWED_HOST only."""
    settings = Settings(upstream_url=engine.base_url, image_url_hosts=ALLOWED_HOST)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def attack_urls(listeners: dict[str, Listener]) -> dict[str, str]:
    v4, v6, allowed = listeners["v4"].port, listeners["v6"].port, listeners["allowed"].port
    return {
        "127.0.0.1": f"http://127.0.0.1:{v4}/metadata",
        "localhost": f"http://localhost:{v4}/metadata",
        "[::1]": f"http://[::1]:{v6}/metadata",
        "IPv4-mapped IPv6": f"http://[::ffff:127.0.0.1]:{v4}/metadata",
        "decimal IP": f"http://2130706433:{v4}/metadata",
        "redirect from an allowed host": f"http://{ALLOWED_HOST}:{allowed}/to?url=http://127.0.0.1:{v4}/metadata",
    }


def chat_body(url: str, model: str = DEV_SERVED_NAME) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this?"}]}]}


def responses_body(url: str, model: str = DEV_SERVED_NAME) -> dict:
    return {"model": model, "max_output_tokens": 4, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "what is this?"}]}]}


ROUTES = {
    "chat": ("/v1/chat/completions", chat_body, DEV_SERVED_NAME),
    "responses": ("/v1/responses", responses_body, DEV_SERVED_NAME),
    "scan model (chat)": ("/v1/chat/completions", chat_body, "scan/price_tags"),
    "scan model (responses)": ("/v1/responses", responses_body, "scan/price_tags"),
}


SPELLINGS = ["127.0.0.1", "localhost", "[::1]", "IPv4-mapped IPv6", "decimal IP", "redirect from an allowed host"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_no_route_reaches_a_loopback_listener(guarded, engine, listeners, spelling):
    url = attack_urls(listeners)[spelling]
    target = listeners["v6" if spelling == "[::1]" else "v4"]
    # The control: this URL does reach the listener when someone fetches it.
    before = len(target.hits)
    try:
        httpx.get(url, follow_redirects=True, timeout=5)
    except httpx.HTTPError as exc:
        pytest.skip(f"optional: {spelling}: this machine cannot connect there at all ({exc!r})")
    assert len(target.hits) == before + 1
    target.hits.clear()
    listeners["allowed"].hits.clear()

    for name, (path, body, model) in ROUTES.items():
        r = guarded.post(path, json=body(url, model))
        assert r.status_code == 400, (name, r.status_code, r.text)
        error = r.json()["error"]
        # The gateway's verdict (the engine would refuse too, in its own words): the
        # host named, the URL not.
        assert error["code"] == "invalid_request" and "SCANNER_IMAGE_URL_HOSTS" in error["message"], (name, error)
        assert "metadata" not in error["message"], (name, error)
    # Around the gateway: the engine's own flags refuse it too.
    direct = httpx.post(f"{engine.base_url}/v1/chat/completions", json=chat_body(url), timeout=60)
    assert direct.status_code == 400, direct.text
    assert target.hits == [], f"{spelling}: the listener was reached"
    if spelling.startswith("redirect"):
        # The gateway asked the allowed host and did not follow it off the list; the
        # engine asked nobody.
        assert len(listeners["allowed"].hits) == 4
    else:
        assert listeners["allowed"].hits == []


def test_an_allowed_host_still_works_on_every_route(guarded, listeners):
    allowed = listeners["allowed"]
    url = f"http://{ALLOWED_HOST}:{allowed.port}/photo.jpg"
    allowed.hits.clear()
    for name, (path, body, model) in ROUTES.items():
        r = guarded.post(path, json=body(url, model))
        assert r.status_code == 200, (name, r.text)
    assert allowed.hits == ["/photo.jpg"] * len(ROUTES)  # once per request, by the gateway


def test_media_kinds_the_product_does_not_serve_are_refused(guarded, listeners):
    clip = "data:video/mp4;base64," + base64.b64encode(b"\0" * 64).decode()
    r = guarded.post("/v1/chat/completions", json={"model": DEV_SERVED_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "media_kind_not_allowed", r.text

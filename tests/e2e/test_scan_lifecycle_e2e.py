"""A scan's life at the real engine: a client that leaves, the deadline, a truncated answer.

The engine's batch is filled first (`engine_full`), so the scan waits inside the engine
for as long as the test needs: what happens to it then is the gateway's doing.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.e2e.engine_watch import (
    engine_full,
    engine_metric,
    finished,
    gateway_metric,
    sent_to_engine,
    wait_finished,
    wait_until,
)
from tests.helpers import serve_in_thread, shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(320, 240, seed=61)


def scan_request(url: str, task: str = "storefront") -> httpx.Request:
    return httpx.Request("POST", f"{url}/v1/scan", files={"image": ("shelf.jpg", PHOTO, "image/jpeg")},
                         data={"task": task})


def test_a_client_that_leaves_a_scan_stops_the_engines_work(gateway_with, engine):
    with gateway_with() as url:
        done = finished(engine.base_url)
        with engine_full(engine.base_url):
            request = scan_request(url)
            body = request.read()
            head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
            where = urlsplit(url)
            with socket.create_connection((where.hostname, where.port)) as sock:
                sock.sendall(f"POST /v1/scan HTTP/1.1\r\nHost: {where.netloc}\r\n{head}\r\n".encode() + body)
                wait_until(lambda: sent_to_engine(url), "the scan is at the engine")
            # Hung up: the gateway gives its slot back and closes the engine request.
            wait_until(lambda: gateway_metric(url, "scanner_replica_in_flight") == 0, "the gateway let go")
            assert gateway_metric(url, "scanner_scans_total", task="storefront", outcome="client_closed_request") == 1
        # The engine is free again and never finished the scan: vLLM aborted it (an aborted
        # request counts in no finished total; one left there would have run by now).
        assert finished(engine.base_url) == done


def test_a_scan_past_its_deadline_is_504_and_the_engine_stops(gateway_with, engine):
    with gateway_with(request_timeout_s=3.0) as url:
        done = finished(engine.base_url)
        with engine_full(engine.base_url):
            r = httpx.Client(timeout=300).send(scan_request(url))
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "upstream_timeout" and "deadline" in r.json()["error"]["message"]
        assert finished(engine.base_url) == done


def test_a_truncated_answer_is_asked_again_with_twice_the_tokens(engine):
    # No valid task can be cut off (startup checks that its longest answer fits), so the
    # test lowers a loaded task's budget below the answer the engine gives (temperature 0:
    # the same answer each time).
    app = create_app(Settings(upstream_url=engine.base_url))
    with serve_in_thread(app) as url, httpx.Client(timeout=300) as client:
        sampling = app.state.gateway.registry.get("storefront").spec.sampling
        whole = client.send(scan_request(url)).json()["usage"]["completion_tokens"]
        assert whole >= 8
        sampling.max_tokens = whole - 1
        cut, stopped = finished(engine.base_url, "length"), finished(engine.base_url, "stop")
        asked = max_tokens_asked(engine.base_url)
        r = client.send(scan_request(url))
        assert r.status_code == 200, r.text
        assert f"first answer invalid (answer cut at max_tokens={whole - 1}); retried with more tokens" \
            in r.json()["warnings"]
        wait_finished(engine.base_url, cut, 1, reason="length")
        wait_finished(engine.base_url, stopped, 1, reason="stop")
        count, total = max_tokens_asked(engine.base_url)
        assert (count - asked[0], total - asked[1]) == (2, (whole - 1) * 3)  # asked again with twice
        assert gateway_metric(url, "scanner_scan_retries_total") == 1

        # Cut on the second try too: a 502 that quotes what the engine wrote.
        sampling.max_tokens = 3
        r = client.send(scan_request(url))
        assert r.status_code == 502 and r.json()["error"]["code"] == "model_output_invalid", r.text
        assert "answer cut at max_tokens=6" in r.json()["error"]["message"]  # 3, doubled


def max_tokens_asked(engine_url: str) -> tuple[float, float]:
    """How many requests vLLM took, and their max_tokens summed."""
    return (engine_metric(engine_url, "vllm:request_params_max_tokens_count"),
            engine_metric(engine_url, "vllm:request_params_max_tokens_sum"))

"""A scan's life at the real engine: a client that leaves, a truncated answer, the deadline.

`long_count` (tests/e2e/long_count.yaml) makes the engine write 12000 characters, seconds
of work, so the scan is still inside the engine when the test acts.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.e2e.engine_watch import (
    engine_metric,
    finished,
    gateway_metric,
    sent_to_engine,
    wait_finished,
    wait_idle,
    wait_until,
)
from tests.helpers import serve_in_thread, shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO = shelf_jpeg(320, 240, seed=61)


def assert_dropped(engine_url: str, finished_before: float) -> None:
    """The engine dropped the long scan: idle again, and the request is not among those it
    finished (vLLM counts every request it completes there, and none it aborted)."""
    wait_idle(engine_url)
    assert finished(engine_url) == finished_before


def scan_request(url: str, task: str) -> httpx.Request:
    return httpx.Request("POST", f"{url}/v1/scan", files={"image": ("shelf.jpg", PHOTO, "image/jpeg")},
                         data={"task": task})


def test_a_client_that_leaves_a_scan_stops_the_engines_work(gateway_with, engine, long_task_prompts):
    with gateway_with(prompts_dir=long_task_prompts) as url:
        done = finished(engine.base_url)
        request = scan_request(url, "long_count")
        body = request.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
        where = urlsplit(url)
        with socket.create_connection((where.hostname, where.port)) as sock:
            sock.sendall(f"POST /v1/scan HTTP/1.1\r\nHost: {where.netloc}\r\n{head}\r\n".encode() + body)
            wait_until(lambda: sent_to_engine(url), "the scan is at the engine")
        # Hung up mid-generation: vLLM aborts the request instead of finishing it for nobody.
        assert_dropped(engine.base_url, done)
        wait_until(lambda: gateway_metric(url, "scanner_scans_total", task="long_count",
                                          outcome="client_closed_request") == 1, "the scan counted as 499")


def test_a_scan_past_its_deadline_is_504_and_the_engine_stops(gateway_with, engine, long_task_prompts):
    with gateway_with(prompts_dir=long_task_prompts, request_timeout_s=3.0) as url:
        done = finished(engine.base_url)
        r = httpx.Client(timeout=300).send(scan_request(url, "long_count"))
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "upstream_timeout" and "deadline" in r.json()["error"]["message"]
        assert_dropped(engine.base_url, done)


def test_a_truncated_answer_is_asked_again_with_twice_the_tokens(engine):
    # No valid task can be cut off (startup checks that its longest answer fits), so the
    # test lowers a loaded task's budget below the answer the engine gives (temperature 0:
    # the same answer each time).
    app = create_app(Settings(upstream_url=engine.base_url))
    with serve_in_thread(app) as url, httpx.Client(timeout=300) as client:
        sampling = app.state.registry.get("storefront").spec.sampling
        whole = client.send(scan_request(url, "storefront")).json()["usage"]["completion_tokens"]
        assert whole >= 8
        sampling.max_tokens = whole - 1
        cut, stopped = finished(engine.base_url, "length"), finished(engine.base_url, "stop")
        asked = max_tokens_asked(engine.base_url)
        r = client.send(scan_request(url, "storefront"))
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
        r = client.send(scan_request(url, "storefront"))
        assert r.status_code == 502 and r.json()["error"]["code"] == "model_output_invalid", r.text
        assert "answer cut at max_tokens=6" in r.json()["error"]["message"]  # 3, doubled


def max_tokens_asked(engine_url: str) -> tuple[float, float]:
    """How many requests vLLM took, and their max_tokens summed."""
    return (engine_metric(engine_url, "vllm:request_params_max_tokens_count"),
            engine_metric(engine_url, "vllm:request_params_max_tokens_sum"))

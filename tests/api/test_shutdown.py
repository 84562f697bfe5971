"""Graceful shutdown of a real gateway process in front of a FAKE ENGINE: its answers are
held for as long as the test needs, which a real engine's cannot be (the real engine's
drain: tests/e2e/test_workers_e2e.py)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.api.test_scan_api import PHOTO
from tests.fake_engine import completion
from tests.helpers import gateway_process


def in_background(target) -> tuple[threading.Thread, dict]:
    results: dict = {}
    thread = threading.Thread(target=lambda: results.update(response=target()))
    thread.start()
    return thread, results


def slow_answer(seconds: float):
    def answer(_):
        reply = completion("done")
        reply.delay_s = seconds
        return reply
    return answer


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("workers", [1, 2])  # the Kubernetes Deployment runs --workers 2
def test_sigterm_drains_then_finishes_in_flight_work(fake_engine, workers, tmp_path):
    fake_engine.answer = slow_answer(5.0)
    with gateway_process(fake_engine.url, tmp_path / "gateway.log", workers, SCANNER_MODEL="m",
                         SCANNER_DRAIN_S="2.0") as gateway:
        proc, base = gateway.proc, gateway.url
        slow_request, results = in_background(lambda: httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30))
        wait_for_engine_request(fake_engine)
        proc.send_signal(signal.SIGTERM)
        # uvicorn's supervisor passes SIGTERM on to its workers on its next tick (0.5 s).
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/ready", headers={"connection": "close"}).status_code == 200:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.05)
        # Every worker says so (new connections land on either), and all keep serving.
        with httpx.Client() as fresh:
            for _ in range(4):
                ready = fresh.get(f"{base}/ready", headers={"connection": "close"})
                assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
                assert fresh.get(f"{base}/health", headers={"connection": "close"}).status_code == 200
        slow_request.join(30)
        assert results["response"].status_code == 200
        assert results["response"].json()["choices"][0]["message"]["content"] == "done"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Finished server process" in gateway.output() or "Shutting down" in gateway.output(), gateway.output()


@pytest.mark.parametrize("route", ["chat", "scan"])
def test_work_cut_at_the_graceful_timeout_gets_a_retryable_503(fake_engine, route, tmp_path):
    fake_engine.answer = slow_answer(10.0)
    send = {
        "chat": lambda base: httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30),
        "scan": lambda base: httpx.post(f"{base}/v1/scan", files={"image": ("a.jpg", PHOTO)},
                                        data={"task": "storefront"}, timeout=30),
    }[route]
    with gateway_process(fake_engine.url, tmp_path / "gateway.log", SCANNER_MODEL="m", SCANNER_DRAIN_S="0",
                         SCANNER_GRACEFUL_TIMEOUT_S="0.5") as gateway:
        proc = gateway.proc
        request, results = in_background(lambda: send(gateway.url))
        wait_for_engine_request(fake_engine)
        proc.send_signal(signal.SIGTERM)
        request.join(30)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    response = results["response"]
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "draining"  # the OpenAI error shape, not uvicorn's text
    output = gateway.output()
    assert "Exception in ASGI application" not in output, output
    assert "answered 503 draining" in output


def wait_for_engine_request(fake_engine) -> None:
    deadline = time.monotonic() + 30
    while not any(r.path.endswith("/chat/completions") for r in fake_engine.received):
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.05)

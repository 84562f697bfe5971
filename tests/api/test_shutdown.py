"""Graceful shutdown of a real gateway process (in front of a FAKE ENGINE)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.api.test_scan_api import PHOTO
from tests.fake_engine import completion
from tests.helpers import free_port


@contextmanager
def gateway_process(engine_url: str, workers: int = 1, **env: str) -> Iterator[tuple[subprocess.Popen, str, list[str]]]:
    """`scanner-gateway serve` in its own process, ready; yields it, its URL and (after
    the block) its output."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scanner_gateway", "serve", "--upstream", engine_url, "--port", str(port),
         "--workers", str(workers)],
        env={**os.environ, "SCANNER_MODEL": "m", **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers too can be killed as one group
    )
    base = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "gateway did not start"
            time.sleep(0.1)
        yield proc, base, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind would hold stdout open
        output.append(proc.stdout.read().decode() if proc.stdout else "")


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
def test_sigterm_drains_then_finishes_in_flight_work(fake_engine, workers):
    fake_engine.answer = slow_answer(2.5)
    with gateway_process(fake_engine.url, workers, SCANNER_DRAIN_S="2.0") as (proc, base, output):
        slow_request, results = in_background(lambda: httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30))
        time.sleep(0.3)  # it is in flight
        proc.send_signal(signal.SIGTERM)
        # uvicorn's supervisor passes SIGTERM on to its workers on its next tick (0.5 s).
        deadline = time.monotonic() + 1.0
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
    assert "Finished server process" in output[0] or "Shutting down" in output[0], output


@pytest.mark.parametrize("route", ["chat", "scan"])
def test_work_cut_at_the_graceful_timeout_gets_a_retryable_503(fake_engine, route):
    fake_engine.answer = slow_answer(10.0)
    send = {
        "chat": lambda base: httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30),
        "scan": lambda base: httpx.post(f"{base}/v1/scan", files={"image": ("a.jpg", PHOTO)},
                                        data={"task": "storefront"}, timeout=30),
    }[route]
    with gateway_process(fake_engine.url, SCANNER_DRAIN_S="0", SCANNER_GRACEFUL_TIMEOUT_S="0.5") as (
            proc, base, output):
        request, results = in_background(lambda: send(base))
        time.sleep(0.5)  # in flight at the engine
        proc.send_signal(signal.SIGTERM)
        request.join(30)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    response = results["response"]
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "draining"  # the OpenAI error shape, not uvicorn's text
    assert "Exception in ASGI application" not in output[0], output[0]
    assert "answered 503 draining" in output[0]

"""Graceful shutdown of a real gateway process (in front of a FAKE ENGINE)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.fake_engine import completion
from tests.helpers import free_port


def test_sigterm_drains_then_finishes_in_flight_work(fake_engine):
    def slow(_):
        reply = completion("done")
        reply.delay_s = 2.5
        return reply

    fake_engine.answer = slow
    port = free_port()
    env = {**os.environ, "SCANNER_DRAIN_S": "1.0", "SCANNER_MODEL": "m"}
    proc = subprocess.Popen([sys.executable, "-m", "scanner_gateway", "serve", "--upstream", fake_engine.url,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
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

        results = {}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        slow_request = threading.Thread(target=lambda: results.update(
            slow=httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)))
        slow_request.start()
        time.sleep(0.3)  # it is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        assert httpx.get(f"{base}/health").status_code == 200  # alive, still serving
        slow_request.join(30)
        assert results["slow"].status_code == 200
        assert results["slow"].json()["choices"][0]["message"]["content"] == "done"
        assert proc.wait(timeout=30) == 0 or proc.returncode == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert "Finished server process" in output or "Shutting down" in output, output

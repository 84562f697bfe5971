"""Metrics, request ids and JSON logs (FAKE ENGINE behind the gateway)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from scanner_gateway import __version__
from scanner_gateway.app import create_app
from scanner_gateway.metrics import GatewayMetrics
from tests.api.test_scan_api import PHOTO, assert_error
from tests.helpers import gateway_process


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_metrics_after_real_traffic(client, fake_engine):
    fake_engine.waiting = 3
    assert client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
    assert_error(client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "nope"}), 404, "unknown_task")
    deadline = time.monotonic() + 30
    while value(text := client.get("/metrics").text, "scanner_replica_engine_waiting", replica=fake_engine.url) != 3:
        assert time.monotonic() < deadline, "no probe round read the engine's gauges"
        time.sleep(0.1)
    assert value(text, "scanner_requests_total", route="/v1/scan", method="POST", status="200") == 1
    assert value(text, "scanner_requests_total", route="/v1/scan", method="POST", status="404") == 1
    assert value(text, "scanner_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert value(text, "scanner_scans_total", task="storefront", outcome="ok") == 1
    assert value(text, "scanner_scans_total", task="storefront", outcome="unknown_task") == 0  # refused before a task
    assert value(text, "scanner_preprocess_duration_seconds_count", task="storefront") == 1
    assert value(text, "scanner_engine_duration_seconds_count", task="storefront") == 1
    assert value(text, "scanner_image_bytes_count") == 1 and value(text, "scanner_image_pixels_sum") == 1600 * 1200
    assert value(text, "scanner_replica_healthy", replica=fake_engine.url) == 1
    assert value(text, "scanner_replica_engine_waiting", replica=fake_engine.url) == 3
    assert value(text, "scanner_admission_in_flight") == 0
    assert value(text, "scanner_event_loop_lag_seconds_count") >= 1  # the watcher ran during the test
    assert "scanner_admission_queue_depth" in text and "scanner_request_duration_seconds_bucket" in text
    assert value(text, "scanner_build_info", version=__version__) == 1
    names = {name for name, _ in samples(text)}
    assert all(n.startswith(("scanner_", "python_", "process_")) for n in names), names
    assert not any(n.startswith("scanner_gpu") for n in names)  # no GPU here: absent, no error


def test_scans_refused_before_routing_still_count_as_scans(settings):
    # The body cap answers before FastAPI routes the request: still a /v1/scan to the operator.
    with TestClient(create_app(settings.model_copy(update={"max_request_bytes": 10_000}))) as c:
        assert_error(c.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"}),
                     413, "payload_too_large")
        text = c.get("/metrics").text
    assert value(text, "scanner_requests_total", route="/v1/scan", method="POST", status="413") == 1
    assert value(text, "scanner_requests_total", route="unmatched", method="POST", status="413") == 0


def test_request_id_is_kept_returned_and_forwarded(client, fake_engine):
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers={"X-Request-Id": "store-42-abc"})
    assert r.headers["x-request-id"] == "store-42-abc"
    chats = [r for r in fake_engine.received if r.path == "/v1/chat/completions"]
    assert chats[-1].headers["x-request-id"] == "store-42-abc"
    fresh = client.get("/v1/tasks").headers["x-request-id"]
    assert len(fresh) == 32 and fresh != "store-42-abc"
    assert client.get("/v1/tasks", headers={"X-Request-Id": "x" * 500}).headers["x-request-id"] != "x" * 500


def test_multiprocess_metrics_sum_every_worker(fake_engine, tmp_path):
    with gateway_process(fake_engine.url, tmp_path / "gateway.log", 2, SCANNER_MODEL="m", SCANNER_DRAIN_S="0") as gw:
        sent = 0
        while len(pids_that_answered(gw.output(), "/v1/chat/completions")) < 2:
            assert sent < 200, "one worker took every connection"
            # A new connection each time: the kernel hands it to whichever worker accepts first.
            assert httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
            sent += 1
        text = httpx.get(f"{gw.url}/metrics").text
    assert value(text, "scanner_requests_total", route="/v1/chat/completions", method="POST", status="200") == sent
    assert value(text, "scanner_replica_healthy", replica=fake_engine.url) == 1  # most recent of both workers
    assert value(text, "scanner_admission_in_flight") == 0  # summed over the live workers
    assert value(text, "scanner_build_info", version=__version__) == 1  # once, not once per worker


def pids_that_answered(output: str, path: str) -> set[int]:
    lines = (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    return {ln["pid"] for ln in lines if ln.get("message") == "request" and ln.get("path") == path}


def test_a_dead_workers_in_flight_gauge_stops_counting(tmp_path, monkeypatch):
    # Two "workers" write their in-flight gauge to a shared dir; one dies without a clean exit.
    write = ("import sys; from prometheus_client import Gauge; "
             "Gauge('scanner_admission_in_flight', 'x', multiprocess_mode='livesum').set(int(sys.argv[1])); "
             "print('ready', flush=True); sys.stdin.read()")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    live = subprocess.Popen([sys.executable, "-c", write, "3"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", write, "7"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline() == dead.stdout.readline() == b"ready\n"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        metrics = GatewayMetrics()
        assert value(metrics.render()[0].decode(), "scanner_admission_in_flight") == 10
        dead.kill()
        dead.wait()
        assert value(metrics.render()[0].decode(), "scanner_admission_in_flight") == 3
        assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 1
    finally:
        for proc in (live, dead):
            proc.kill()
            proc.wait()


def test_logs_are_json_lines_with_request_ids_and_no_image_bytes(fake_engine, tmp_path):
    with gateway_process(fake_engine.url, tmp_path / "gateway.log", SCANNER_MODEL="m", SCANNER_DRAIN_S="0") as gw:
        r = httpx.post(f"{gw.url}/v1/scan", files={"image": ("a.jpg", PHOTO)},
                       data={"task": "storefront"}, headers={"X-Request-Id": "log-me-1"}, timeout=30)
        assert r.status_code == 200
        gw.proc.terminate()
        gw.proc.wait(30)
    out = gw.output()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([ln for ln in out.splitlines() if ln.strip()]), out  # every line is JSON
    access = [ln for ln in lines if ln.get("request_id") == "log-me-1" and ln["message"] == "request"]
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/v1/scan" and access[0]["duration_ms"] > 0
    assert access[0]["pid"] == gw.proc.pid
    assert "/9j/" not in out and "base64" not in out  # no image bytes anywhere
    assert all(datetime.fromisoformat(ln["time"]).utcoffset() == timedelta(0) for ln in lines)
    assert "\x1b[" not in out and not any("color_message" in ln for ln in lines)  # uvicorn's coloured copies

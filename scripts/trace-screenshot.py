"""Takes docs/screenshots/scan-trace.png: one scan's trace in a real OTLP trace UI.

Arize Phoenix (PyPI, OTLP/HTTP on its port 6006) gets the spans of `scanner-gateway up`
(gateway and its vLLM, every request sampled); one price-tag scan of a generated photo is
sent, and Chromium (Playwright) opens its trace with the engine attempt selected.
Phoenix goes in a venv of its own (its pins clash with vLLM's):

    python3 -m venv /tmp/phoenix && /tmp/phoenix/bin/pip install arize-phoenix
    PHOENIX_BIN=/tmp/phoenix/bin/phoenix .venv/bin/python scripts/trace-screenshot.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots" / "scan-trace.png"
PHOENIX = "http://127.0.0.1:6006"
GATEWAY_PORT, ENGINE_PORT = 8090, 8091


def wait_for(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} never answered")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="trace-shot-"))
    phoenix = subprocess.Popen(
        [os.environ.get("PHOENIX_BIN", "phoenix"), "serve"],
        env={**os.environ, "PHOENIX_PORT": "6006", "PHOENIX_WORKING_DIR": str(work / "phoenix")},
        stdout=(work / "phoenix.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    up = None
    try:
        wait_for(f"{PHOENIX}/healthz", 120)
        traced = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": PHOENIX, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
        cli = str(ROOT / ".venv" / "bin" / "scanner-gateway")
        up = subprocess.Popen([cli, "up", "--port", str(GATEWAY_PORT), "--engine-port", str(ENGINE_PORT)], env=traced,
                              cwd=ROOT, stdout=(work / "up.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
        wait_for(f"http://127.0.0.1:{GATEWAY_PORT}/ready", 600)
        photo = work / "shelf.jpg"
        subprocess.run([cli, "sample-photo", str(photo), "--width", "1600", "--height", "1200"], check=True)
        r = httpx.post(f"http://127.0.0.1:{GATEWAY_PORT}/v1/scan", files={"image": ("shelf.jpg", photo.read_bytes(), "image/jpeg")},
                       data={"task": "price_tags"}, timeout=600)
        r.raise_for_status()
        trace_id = r.headers["x-trace-id"]
        time.sleep(8)  # both exporters' batch delay (5 s) and Phoenix's ingestion
        projects = httpx.get(f"{PHOENIX}/v1/projects", timeout=10).json()["data"]
        project = next(p["id"] for p in projects if p["name"] == "default")  # Phoenix's, for spans naming none
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(f"{PHOENIX}/projects/{project}/traces/{trace_id}")
            page.get_by_text("engine attempt", exact=True).first.click()
            page.get_by_text("Attributes", exact=True).first.click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT))
            browser.close()
        print(f"trace {trace_id}: {OUT}")
    finally:
        if up is not None:
            os.killpg(up.pid, signal.SIGINT)
            up.wait(timeout=60)
        os.killpg(phoenix.pid, signal.SIGTERM)
        phoenix.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Pass-through overhead: the same load straight at an engine and through the gateway, one run.

    .venv/bin/python bench/passthrough.py [--concurrency 64] [--seconds 10] [--body-kb 100]

The engine here is a FAKE ENGINE (a tiny ASGI app that answers every chat completion
after a fixed delay, default 50 ms): a real vLLM on CPU would hide the gateway's cost
behind its own. It measures only what the gateway adds: req/s, added p50/p99 latency,
and the gateway process's CPU per request (Linux /proc). The load generator (httpx,
in this process) shares the machine, so absolute req/s depend on the box; the ratio
gateway/direct is the figure to compare.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINE = r'''
import asyncio, sys
ANSWER = b'{"id":"x","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
DELAY = float(sys.argv[2])
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if scope["path"] != "/health":
        await asyncio.sleep(DELAY)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})
import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, body: bytes, concurrency: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        raise RuntimeError(f"{errors} requests failed against {url}")
    return latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(concurrency: int = 64, seconds: float = 10.0, body_kb: int = 100, delay_ms: float = 50.0) -> None:
    console = Console()
    image = base64.b64encode(os.urandom(body_kb * 1024 * 3 // 4)).decode()
    body = json.dumps({"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}},
        {"type": "text", "text": "what is on the shelf?"}]}]}).encode()
    engine_port, gw_port = free_port(), free_port()
    engine = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, str(engine_port), str(delay_ms / 1000)])
    gateway = subprocess.Popen(
        [sys.executable, "-m", "scanner_gateway", "serve", "--upstream", f"http://127.0.0.1:{engine_port}",
         "--port", str(gw_port)],
        env={**os.environ, "SCANNER_MODEL": "fake"}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/health")
        rows = {}
        for name, port in (("direct (fake engine)", engine_port), ("gateway", gw_port)):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            asyncio.run(load(url, body, concurrency, 2.0))  # warm-up: connections, caches
            cpu0 = cpu_seconds(gateway.pid)
            lat = asyncio.run(load(url, body, concurrency, seconds))
            cpu = cpu_seconds(gateway.pid) - cpu0
            rows[name] = (len(lat) / seconds, statistics.median(lat), pct(lat, 0.99), cpu / len(lat) * 1000)
        direct, gw = rows["direct (fake engine)"], rows["gateway"]
        table = Table(title=f"pass-through, c={concurrency}, {len(body) // 1024} KB bodies, "
                            f"fake engine {delay_ms:.0f} ms, 1 gateway worker, {seconds:.0f} s each")
        for col in ("target", "req/s", "p50 ms", "p99 ms", "gateway CPU ms/req"):
            table.add_column(col, justify="right")
        table.add_row("direct (fake engine)", f"{direct[0]:.0f}", f"{direct[1]:.1f}", f"{direct[2]:.1f}", "-")
        table.add_row("gateway", f"{gw[0]:.0f}", f"{gw[1]:.1f}", f"{gw[2]:.1f}", f"{gw[3]:.2f}")
        console.print(table)
        console.print(f"gateway/direct req/s = {gw[0] / direct[0]:.2f}; added p50 = {gw[1] - direct[1]:.1f} ms, "
                      f"added p99 = {gw[2] - direct[2]:.1f} ms")
    finally:
        for proc in (gateway, engine):
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    typer.run(main)

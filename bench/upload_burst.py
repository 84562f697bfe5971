"""A burst of phone photos uploaded at the gateway: its intake and admission under overload.

    .venv/bin/python -m bench.upload_burst [--rate 60] [--seconds 5] [--max-in-flight 4]
                                           [--queue-wait-s 1] [--fake-ms 300] [--size 4000x3000]

The engine is the FAKE ENGINE of bench/passthrough.py (a schema-valid sample answer to
every scan after `--fake-ms`): with a fixed service time, what moves is the gateway's own
work, reading multipart uploads, refusing the excess with 429, decoding and resizing what
it admits. Open loop: `--rate` multipart scans/s (distinct synthetic shelf photos) for
`--seconds`, whatever earlier ones are doing.

Prints the status mix, how fast the 429s came, the admitted answers' latency against the
bound the gateway promises (queue wait + service time + its own decode), and the
gateway's CPU per request. Measured with its first version (the same open loop and fake
answers; 2026-11-27, one H200 box's 16 cores, 188 12 MP uploads/s, 16 in flight, 9.1 s
queue wait, 850 ms service; two runs each): 429 p99
26-32 ms and gateway CPU 19.2-20.7 s before the intake change (e98f735), 9-15 ms and
16.8-17.7 s after; admitted max 10.1-10.7 s either way (bound ~10 s).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter

import httpx
import typer
from rich.console import Console
from rich.table import Table

from bench.common import ROOT, exit_on_sigterm, free_port, pct, process_tree_cpu_s, wait_http
from bench.fake_engine import start_fake_engine
from bench.overload import paced
from scanner_gateway.synthetic import shelf_jpeg

console = Console()


async def burst(base: str, photos: list[bytes], rate: float, seconds: float) -> list[tuple[int | str, float]]:
    """(status or exception name, latency ms) of each scan, offered at `rate`/s."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def one(i: int) -> tuple[int | str, float]:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/scan", files={"image": ("shelf.jpg", photos[i % len(photos)], "image/jpeg")},
                                      data={"task": "product_scan", "locale": "en"})
                status: int | str = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return status, (time.perf_counter() - t0) * 1000

        return await paced(rate, seconds, one)


def main(rate: float = 60.0, seconds: float = 5.0, max_in_flight: int = 4, queue_wait_s: float = 1.0,
         fake_ms: float = 300.0, size: str = "4000x3000", photos_n: int = 8,
         fake_per_running_ms: float = typer.Option(
             0.0, help="The fake engine answers this much later per request already running when one "
                       "arrives (a batching engine: a burst's first answers come fast, the rest slower).")) -> None:
    width, height = (int(v) for v in size.split("x"))
    photos = [shelf_jpeg(width, height, seed=9000 + i) for i in range(photos_n)]
    engine_port, gw_port = free_port(), free_port()
    engine = start_fake_engine(engine_port, fake_ms / 1000, fake_per_running_ms / 1000)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "scanner_gateway", "serve", "--upstream", f"http://127.0.0.1:{engine_port}",
         "--port", str(gw_port)],
        env={**os.environ, "SCANNER_MODEL": "fake", "SCANNER_ACCESS_LOG": "false", "SCANNER_DRAIN_S": "0",
             "SCANNER_MAX_IN_FLIGHT_PER_REPLICA": str(max_in_flight), "SCANNER_MAX_QUEUE_WAIT_S": str(queue_wait_s)},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/ready")
        base = f"http://127.0.0.1:{gw_port}"
        with httpx.Client(base_url=base, timeout=60) as client:  # warm-up, and the unloaded time
            quiet = []
            for photo in photos[:4]:
                t0 = time.perf_counter()
                r = client.post("/v1/scan", files={"image": ("shelf.jpg", photo, "image/jpeg")},
                                data={"task": "product_scan", "locale": "en"})
                if r.status_code != 200:
                    raise SystemExit(f"warm-up scan failed: {r.status_code} {r.text[:300]}")
                quiet.append((time.perf_counter() - t0) * 1000)
        cpu0 = process_tree_cpu_s(gateway.pid)
        results = asyncio.run(burst(base, photos, rate, seconds))
        cpu = process_tree_cpu_s(gateway.pid) - cpu0
    finally:
        gateway.terminate()
        engine.terminate()
    statuses = Counter(s for s, _ in results)
    admitted = [ms for s, ms in results if s == 200]
    refused = [ms for s, ms in results if s == 429]
    per_running = f" + {fake_per_running_ms:g} ms per request running" if fake_per_running_ms else ""
    table = Table(title=f"upload burst: {size} photos, FAKE ENGINE answering in {fake_ms:g} ms{per_running}, "
                        f"{os.cpu_count()} CPUs, max in flight {max_in_flight}, queue wait <= {queue_wait_s:g} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("offered", f"{rate:g} scans/s for {seconds:g} s ({len(results)})")
    table.add_row("status mix", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    table.add_row("429 p50 / p99 ms", f"{pct(refused, 0.5):.0f} / {pct(refused, 0.99):.0f}")
    table.add_row("admitted p50 / p99 / max ms",
                  f"{pct(admitted, 0.5):.0f} / {pct(admitted, 0.99):.0f} / {max(admitted, default=float('nan')):.0f}")
    # A full engine answers later than an idle one: the fake's extra at full load counts too.
    bound_ms = queue_wait_s * 1000 + max(quiet) + fake_per_running_ms * (max_in_flight - 1)
    table.add_row("bound: queue wait + unloaded max (+ full-load extra) ms", f"{bound_ms:.0f}")
    table.add_row("gateway CPU", f"{cpu:.1f} s ({1000 * cpu / len(results):.1f} ms per request)")
    console.print(table)


if __name__ == "__main__":
    exit_on_sigterm()
    typer.run(main)

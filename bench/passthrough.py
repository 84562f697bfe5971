"""Pass-through overhead: the same load straight at an engine and through the gateway, one run.

    .venv/bin/python -m bench.passthrough [--concurrency 64] [--seconds 10] [--body-kb 100] [--workers 1]
                                          [--pin-gateway N]

The gateway runs with its default settings (admission with no fixed cap, metrics,
request ids, the media check, the access log; `--no-access-log` turns the log off). The engine here is a FAKE ENGINE (a tiny raw-ASGI app that answers every chat completion
after a fixed delay, default 50 ms, and streams SSE when asked): a real vLLM would hide
the gateway's cost behind its own. It measures only what the gateway adds:

- req/s and p50/p99 latency at concurrency C, direct vs through the gateway, from `wrk`
  (apt-get install wrk; a C load generator, so the client is not the bottleneck; without
  it a slower Python generator is used and says so), then again from `h2load` (apt-get
  install nghttp2-client), a second, independent closed-loop generator;
- the gateway's CPU per request under each (Linux /proc, all its worker processes);
- streaming time-to-first-byte, direct vs gateway (sequential requests, median).

`--pin-gateway N` (Linux) gives the gateway CPUs 0..N-1 to itself and the load generator
and fake engine the rest, as in a deployment where the gateway has its own cores: what
is then left of the added latency is the gateway's own, not CPU contention.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from bench.common import ROOT, exit_on_sigterm, free_port, process_tree_cpu_s, wait_http
from bench.fake_engine import start_fake_engine


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", text)
    if not match:
        raise RuntimeError(f"wrk printed no {label} latency:\n{text}")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def load_wrk(url: str, body_file: Path, concurrency: int, seconds: float) -> LoadResult:
    script = body_file.with_suffix(".lua")
    script.write_text(
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        'wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(errors_match.group(1)) if errors_match else 0
    errors += sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    return LoadResult(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                      _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), requests, errors)


def load_h2load(url: str, body_file: Path, concurrency: int, seconds: float) -> LoadResult:
    """nghttp2's h2load over HTTP/1.1: a second closed-loop C load generator, independent
    of wrk (another event loop, connection handling and timing); percentiles from its
    per-request log."""
    log = body_file.with_name("h2load.log")
    out = subprocess.run(
        ["h2load", "--h1", f"-c{concurrency}", "-t1", f"-D{seconds:g}", "-d", str(body_file),
         "-H", "content-type: application/json", "--log-file", str(log), url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    requests, succeeded = int(done.group(1)), int(done.group(2))
    latencies = sorted(int(fields[2]) / 1000 for fields in (line.split("\t") for line in log.read_text().splitlines())
                       if len(fields) >= 3 and fields[1] == "200")
    errors = requests - min(succeeded, int(codes.group(1)) if codes else succeeded)
    return LoadResult(rps, statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))], requests, errors)


async def _load_python(url: str, body: bytes, concurrency: int, seconds: float) -> LoadResult:
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
    latencies.sort()
    return LoadResult(len(latencies) / seconds, statistics.median(latencies),
                      latencies[int(0.99 * (len(latencies) - 1))], len(latencies) + errors, errors)


def ttfb_ms(url: str, body: bytes, n: int) -> float:
    """Median time to the first body byte of a streamed answer, sequential requests."""
    samples = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as r:
                chunks = r.iter_raw()
                next(chunks)
                samples.append((time.perf_counter() - t0) * 1000)
                for _ in chunks:
                    pass
    return statistics.median(samples)


def main(
    concurrency: int = 64, seconds: float = 10.0, body_kb: int = 100, delay_ms: float = 50.0,
    workers: int = 1, ttfb_requests: int = 100, pin_gateway: int = 0,
    access_log: bool = typer.Option(True, help="The gateway's access log (on by default, as it ships)."),
) -> None:
    console = Console()
    gateway_cpus: set[int] | None = None
    if pin_gateway:
        cpus = sorted(os.sched_getaffinity(0))
        if not 0 < pin_gateway < len(cpus):
            raise typer.BadParameter(f"--pin-gateway must leave CPUs for the load: 1..{len(cpus) - 1}")
        gateway_cpus = set(cpus[:pin_gateway])
        os.sched_setaffinity(0, cpus[pin_gateway:])  # this process, wrk and the fake engine
    image = base64.b64encode(os.urandom(body_kb * 1024 * 3 // 4)).decode()
    request = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}},
        {"type": "text", "text": "what is on the shelf?"}]}]}
    body = json.dumps(request).encode()
    stream_body = json.dumps({**request, "stream": True}).encode()
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        console.print("[yellow]wrk not found (apt-get install wrk): using the Python load generator, "
                      "which saturates before the gateway does; req/s figures understate both sides.")
    tmp = Path(tempfile.mkdtemp(prefix="bench-passthrough-"))
    body_file = tmp / "body.json"
    body_file.write_bytes(body)

    engine_port, gw_port = free_port(), free_port()
    engine = start_fake_engine(engine_port, delay_ms / 1000)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "scanner_gateway", "serve", "--upstream", f"http://127.0.0.1:{engine_port}",
         "--port", str(gw_port), "--workers", str(workers)],
        env={**os.environ, "SCANNER_MODEL": "fake", "SCANNER_ACCESS_LOG": str(access_log).lower()}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, gateway_cpus)) if gateway_cpus else None,
    )
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/health")
        systems = {"direct (fake engine)": engine_port, "gateway": gw_port}
        loads: dict[str, Callable[[str, float], LoadResult]] = (
            {"wrk": lambda url, secs: load_wrk(url, body_file, concurrency, secs)} if use_wrk
            else {"python httpx": lambda url, secs: asyncio.run(_load_python(url, body, concurrency, secs))})
        if shutil.which("h2load"):
            loads["h2load"] = lambda url, secs: load_h2load(url, body_file, concurrency, secs)
        else:
            console.print("[yellow]h2load not found (apt-get install nghttp2-client): one load generator only")
        rows = measure(loads, systems, gateway.pid, seconds)
        ttfb = {name: ttfb_ms(f"http://127.0.0.1:{port}/v1/chat/completions", stream_body, ttfb_requests)
                for name, port in systems.items()}
        console.print(rows_table(
            rows, f"pass-through: c={concurrency}, {len(body) // 1024} KB bodies, fake engine {delay_ms:.0f} ms, "
                  f"{workers} gateway worker(s), {seconds:g} s each, load by {' and '.join(loads)}, "
                  f"{os.cpu_count()} CPUs, access log {'on' if access_log else 'off'}"
                  + (f", gateway pinned to CPUs {sorted(gateway_cpus)}" if gateway_cpus else "")))
        print_targets(console, rows, loads)
        console.print(f"stream TTFB (median of {ttfb_requests}): direct {ttfb['direct (fake engine)']:.2f} ms, "
                      f"added by the gateway {ttfb['gateway'] - ttfb['direct (fake engine)']:+.2f} ms")
    finally:
        for proc in (gateway, engine):
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


Rows = dict[tuple[str, str], tuple[LoadResult, float]]  # (generator, system) -> result, gateway CPU ms/request


def measure(loads: dict[str, Callable[[str, float], LoadResult]], systems: dict[str, int], gateway_pid: int,
            seconds: float) -> Rows:
    rows: Rows = {}
    for generator, load in loads.items():
        for name, port in systems.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            load(url, 2.0)  # warm-up: connections, caches
            cpu0 = process_tree_cpu_s(gateway_pid)
            result = load(url, seconds)
            rows[(generator, name)] = (result, (process_tree_cpu_s(gateway_pid) - cpu0) / max(result.requests, 1) * 1000)
    return rows


def rows_table(rows: Rows, title: str) -> Table:
    table = Table(title=title)
    for col in ("target", "load", "req/s", "p50 ms", "p99 ms", "errors", "gateway CPU ms/req"):
        table.add_column(col, justify="right")
    for (generator, name), (r, cpu_ms) in rows.items():
        table.add_row(name, generator, f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.errors),
                      "-" if name.startswith("direct") else f"{cpu_ms:.3f}")
    return table


def print_targets(console: Console, rows: Rows, loads: dict) -> None:
    for generator in loads:
        (direct, _), (gw, cpu) = rows[(generator, "direct (fake engine)")], rows[(generator, "gateway")]
        ratio, added_p99 = gw.rps / direct.rps, gw.p99_ms - direct.p99_ms
        for what, met in ((f"req/s >= 0.97x direct: {ratio:.3f}x", ratio >= 0.97),
                          (f"p99 <= +5 ms: {added_p99:+.1f} ms", added_p99 <= 5),
                          (f"gateway CPU <= 0.3 ms/request: {cpu:.3f} ms", cpu <= 0.3)):
            console.print(f"target ({generator}) {what}: {'met' if met else 'MISSED'}")
        console.print(f"{generator}: gateway/direct req/s = {ratio:.3f}; added p50 = {gw.p50_ms - direct.p50_ms:+.1f} "
                      f"ms, added p99 = {added_p99:+.1f} ms; gateway CPU = {cpu:.3f} ms/request")


if __name__ == "__main__":
    exit_on_sigterm()
    typer.run(main)

"""Pass-through overhead: the same load straight at an engine and through the gateway, one run.

    .venv/bin/python bench/passthrough.py [--concurrency 64] [--seconds 10] [--body-kb 100] [--workers 1]
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
import socket
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

ROOT = Path(__file__).resolve().parents[1]
FAKE_ENGINE = r'''
import asyncio, json, sys
ANSWER = b'{"id":"x","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
EVENT = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
DELAY = float(sys.argv[2])
# Seconds more per request already running when one arrives (0: a fixed service time).
# A batching engine answers a request that arrives into a busy batch later than one that
# finds it empty: the first answers of a burst come fast, the rest slower.
PER_RUNNING = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
# Requests it runs at once (0: no limit); the rest wait in its queue, as vLLM's
# --max-num-seqs makes them, and /metrics reports both as vLLM's gauges do.
SEATS = int(sys.argv[4]) if len(sys.argv) > 4 else 0
running = waiting = 0
seats = asyncio.Semaphore(SEATS) if SEATS else None
GAUGES = "vllm:num_requests_running %d\nvllm:num_requests_waiting %d\nvllm:kv_cache_usage_perc 0.1\n"
async def app(scope, receive, send):
    global running, waiting
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] in ("/health", "/metrics"):
        text = (GAUGES % (running, waiting)).encode() if scope["path"] == "/metrics" else b""
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": text})
        return
    if seats is not None:
        waiting += 1
        try:
            await seats.acquire()
        finally:
            waiting -= 1
    delay = DELAY + PER_RUNNING * running
    running += 1
    try:
        await asyncio.sleep(delay)
    finally:
        running -= 1
        if seats is not None:
            seats.release()
    if b'"stream": true' in body:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(5):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
            await asyncio.sleep(0.005)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    answer = ANSWER
    if b'"response_format"' in body:  # a scan: a schema-valid sample (bench/upload_burst.py)
        from scanner_gateway.scan.schema import sample_instance
        schema = json.loads(body)["response_format"]["json_schema"]["schema"]
        answer = ANSWER.replace(b'"content":"ok"', b'"content":' + json.dumps(json.dumps(sample_instance(schema))).encode())
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})
import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
'''


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def process_tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of `pid` and its children (the gateway's workers)."""
    total, pids = 0.0, [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    engine = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, str(engine_port), str(delay_ms / 1000)])
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
        rows: dict[tuple[str, str], tuple[LoadResult, float]] = {}
        for generator, load in loads.items():
            for name, port in systems.items():
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                load(url, 2.0)  # warm-up: connections, caches
                cpu0 = process_tree_cpu_s(gateway.pid)
                result = load(url, seconds)
                rows[(generator, name)] = (result, (process_tree_cpu_s(gateway.pid) - cpu0) / max(result.requests, 1) * 1000)
        ttfb = {name: ttfb_ms(f"http://127.0.0.1:{port}/v1/chat/completions", stream_body, ttfb_requests)
                for name, port in systems.items()}
        table = Table(title=f"pass-through: c={concurrency}, {len(body) // 1024} KB bodies, fake engine "
                            f"{delay_ms:.0f} ms, {workers} gateway worker(s), {seconds:g} s each, "
                            f"load by {' and '.join(loads)}, {os.cpu_count()} CPUs, "
                            f"access log {'on' if access_log else 'off'}"
                            + (f", gateway pinned to CPUs {sorted(gateway_cpus)}" if gateway_cpus else ""))
        for col in ("target", "load", "req/s", "p50 ms", "p99 ms", "errors", "gateway CPU ms/req"):
            table.add_column(col, justify="right")
        for (generator, name), (r, cpu_ms) in rows.items():
            table.add_row(name, generator, f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.errors),
                          "-" if name.startswith("direct") else f"{cpu_ms:.3f}")
        console.print(table)
        for generator in loads:
            (direct, _), (gw, cpu) = rows[(generator, "direct (fake engine)")], rows[(generator, "gateway")]
            ratio, added_p99 = gw.rps / direct.rps, gw.p99_ms - direct.p99_ms
            for what, met in ((f"req/s >= 0.97x direct: {ratio:.3f}x", ratio >= 0.97),
                              (f"p99 <= +5 ms: {added_p99:+.1f} ms", added_p99 <= 5),
                              (f"gateway CPU <= 0.3 ms/request: {cpu:.3f} ms", cpu <= 0.3)):
                console.print(f"target ({generator}) {what}: {'met' if met else 'MISSED'}")
            console.print(f"{generator}: gateway/direct req/s = {ratio:.3f}; added p50 = {gw.p50_ms - direct.p50_ms:+.1f} "
                          f"ms, added p99 = {added_p99:+.1f} ms; gateway CPU = {cpu:.3f} ms/request")
        console.print(f"stream TTFB (median of {ttfb_requests}): direct {ttfb['direct (fake engine)']:.2f} ms, "
                      f"added by the gateway {ttfb['gateway'] - ttfb['direct (fake engine)']:+.2f} ms")
    finally:
        for proc in (gateway, engine):
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    typer.run(main)

"""Scale-out: scans/s with 1, 2, 4 and 8 engine replicas behind 1 to 4 gateway workers.

    .venv/bin/python -m bench.scale [--service-s 2] [--knee 8] [--seconds 30] [--workers 1,2,4]

FAKE ENGINES with a GPU's capacity curve (bench/gpu_like_engine.py: a request takes
`--service-s` while up to `--knee` run, longer past it; capacity knee/service scans/s
each), on 127.0.0.2-9 behind one DNS name (bench/dns_zone.py): the gateway runs with its
default settings and SCANNER_UPSTREAMS=dns+http://NAME:PORT, as in Kubernetes. The
engines sleep instead of computing, so this machine's CPUs are not the limit: the output
gives the machine's CPU busy share for each step to show it.

Each step offers closed-loop load sized to it (1.5 x knee clients per replica, starts
spread over a service time) and counts the scans answered in `--seconds` after a warm-up.
Efficiency: scans/s over replicas x one replica's capacity (measured straight at one
engine, no gateway). Then:
- one replica of four 3x slower: least-loaded and round-robin, against the four's total;
- under load, a replica added to DNS (seconds until it serves, against two probe
  intervals) and one removed (requests failed: none expected).
Writes bench/results/scale-<time>-<commit>.md and .json.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import typer

from bench.common import (
    CpuMeter,
    console,
    exit_on_sigterm,
    machine,
    pct,
    results_base,
    start,
    stop,
    wait_http,
)
from bench.dns_zone import DnsZone
from scanner_gateway.synthetic import shelf_jpeg

NAME = "engines.scale.test"
HOSTS = [f"127.0.0.{i}" for i in range(2, 10)]  # the eight replicas
SLOW_HOST = "127.0.0.10"  # the 3x slower one
PROBE_INTERVAL_S = 1.0  # the gateway's default (SCANNER_PROBE_INTERVAL_S), not set here
CLIENTS_PER_KNEE = 1.5


@dataclass
class Step:
    label: str
    workers: int
    replicas: int
    clients: int
    scans_per_s: float
    capacity: float
    efficiency: float
    p50_ms: float
    p95_ms: float
    failed: int
    cpu_busy: float


def port_free_on_all(hosts: list[str]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue


def served(host: str, port: int) -> float:
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
    return float(re.search(r"^fake:requests_served_total (\S+)$", text, re.MULTILINE).group(1))


async def closed_loop(url: str, clients: int, warmup_s: float, seconds: float, spread_s: float,
                      photo: bytes, scan: bool = True) -> tuple[list[float], int]:
    """Latencies (ms) of the answers inside the window, and failures (any time)."""
    latencies: list[float] = []
    failed = 0
    t0 = time.monotonic()
    window = (t0 + warmup_s, t0 + warmup_s + seconds)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one_client(i: int) -> None:
            nonlocal failed
            await asyncio.sleep(spread_s * i / clients)  # spread: no waves of answers
            while time.monotonic() < window[1]:
                started = time.monotonic()
                try:
                    if scan:
                        r = await client.post(f"{url}/v1/scan", files={"image": ("s.jpg", photo, "image/jpeg")},
                                              data={"task": "storefront"})
                    else:
                        r = await client.post(f"{url}/v1/chat/completions", json={
                            "model": "fake", "messages": [{"role": "user", "content": "hi"}]})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                ended = time.monotonic()
                if not ok:
                    failed += 1
                elif window[0] <= ended < window[1]:
                    latencies.append((ended - started) * 1000)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies, failed


def measure(url: str, clients: int, warmup_s: float, seconds: float, spread_s: float, photo: bytes,
            scan: bool = True) -> tuple[float, list[float], int, float]:
    cpu = CpuMeter()
    cpu.start()
    latencies, failed = asyncio.run(closed_loop(url, clients, warmup_s, seconds, spread_s, photo, scan))
    return len(latencies) / seconds, latencies, failed, cpu.stop()


@contextmanager
def engines(hosts: list[str], port: int, service_s: float, knee: int, seats: int, log: Path):
    procs = [start([sys.executable, "-m", "bench.gpu_like_engine", h, str(port), str(service_s), str(knee), str(seats)],
                   log=log) for h in hosts]
    try:
        for h in hosts:
            wait_http(f"http://{h}:{port}/health")
        yield
    finally:
        for p in procs:
            stop(p)


@contextmanager
def gateway(port: int, engine_port: int, dns: str, workers: int, log: Path, **env: str):
    proc = start([sys.executable, "-m", "scanner_gateway", "serve", "--port", str(port), "--workers", str(workers)],
                 env={"SCANNER_UPSTREAMS": f"dns+http://{NAME}:{engine_port}", "SCANNER_DNS_SERVER": dns,
                      "SCANNER_MODEL": "fake", **env}, log=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def wait_replicas(url: str, count: int, timeout_s: float = 60) -> None:
    """Until 20 answers in a row (any worker's) list `count` routable replicas."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 20:
        replicas = httpx.get(f"{url}/ready", timeout=10).json().get("replicas", [])
        routable = [r for r in replicas if r["healthy"] and not r.get("leaving")]
        streak = streak + 1 if len(routable) == count else 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway never listed {count} replicas: {replicas}")
        time.sleep(0.05)


def main(
    service_s: float = typer.Option(2.0, help="A request's time at the engine while at most --knee run."),
    knee: int = typer.Option(8, help="Requests an engine runs without slowing (its batch knee)."),
    seats: int = typer.Option(32, help="Requests an engine runs at once at most (vLLM's --max-num-seqs)."),
    seconds: float = typer.Option(30.0, help="Measured time per step, after the warm-up."),
    warmup_s: float = typer.Option(8.0),
    workers: str = typer.Option("1,2,4", help="Gateway worker processes to try."),
    replicas: str = typer.Option("1,2,4,8", help="Replica counts to try (at most 8)."),
    out: str = typer.Option(None, help="Results file name (default: scale-<time>-<commit>)."),
) -> None:
    exit_on_sigterm()
    base = results_base(out, "scale")
    logs = base.parent / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{base.name}.log"
    photo = shelf_jpeg(160, 120, seed=5)
    worker_counts = [int(w) for w in workers.split(",")]
    replica_counts = [int(r) for r in replicas.split(",")]
    spread = service_s * CLIENTS_PER_KNEE
    port = port_free_on_all([*HOSTS, SLOW_HOST])
    zone = DnsZone()
    steps: list[Step] = []
    lines: list[str] = []

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        lines.append(line)

    say(f"FAKE ENGINES (bench/gpu_like_engine.py): {service_s:g} s per request up to {knee} running, "
        f"slower past it; {seats} seats; capacity {knee / service_s:g} scans/s each in theory")
    with zone.serving() as dns, ExitStack() as stack:
        stack.enter_context(engines(HOSTS, port, service_s, knee, seats, log))
        one = knee * CLIENTS_PER_KNEE
        rate, lat, _, busy = measure(f"http://{HOSTS[0]}:{port}", math.ceil(one), warmup_s, seconds, spread, photo,
                                     scan=False)
        capacity = rate
        say(f"one replica, straight (no gateway), {math.ceil(one)} clients: {rate:.2f} req/s "
            f"(p50 {pct(lat, 0.5):.0f} ms); machine CPU busy {busy:.0%}")
        for w in worker_counts:
            gw_port = port_free_on_all(["127.0.0.1"])
            zone.set(NAME, HOSTS[:1])
            with gateway(gw_port, port, dns, w, log) as url:
                for r in replica_counts:
                    zone.set(NAME, HOSTS[:r])
                    wait_replicas(url, r)
                    clients = math.ceil(one * r)
                    rate, lat, failed, busy = measure(url, clients, warmup_s, seconds, spread, photo)
                    step = Step(f"{w} workers, {r} replicas", w, r, clients, rate, capacity * r, rate / (capacity * r),
                                pct(lat, 0.5), pct(lat, 0.95), failed, busy)
                    steps.append(step)
                    say(f"{step.label}: {clients} clients, {rate:.2f} scans/s, efficiency {step.efficiency:.3f} "
                        f"(target >= 0.9: {'met' if step.efficiency >= 0.9 else 'MISSED'}), p50 {step.p50_ms:.0f} ms, "
                        f"p95 {step.p95_ms:.0f} ms, failed {failed}, machine CPU busy {busy:.0%}")

        # One replica of four three times slower.
        stack.enter_context(engines([SLOW_HOST], port, service_s * 3, knee, seats, log))
        slow_rate, _, _, _ = measure(f"http://{SLOW_HOST}:{port}", math.ceil(one), warmup_s + service_s * 3,
                                     seconds, spread * 3, photo, scan=False)
        total = 3 * capacity + slow_rate
        say(f"the slow replica straight: {slow_rate:.2f} req/s; three fast and it: {total:.2f}")
        mixed = {}
        for policy in ("least_loaded", "round_robin"):
            gw_port = port_free_on_all(["127.0.0.1"])
            zone.set(NAME, [*HOSTS[:3], SLOW_HOST])
            with gateway(gw_port, port, dns, 1, log, SCANNER_ROUTING=policy) as url:
                wait_replicas(url, 4)
                clients = math.ceil(one * 4)
                rate, lat, failed, busy = measure(url, clients, warmup_s + service_s * 3, seconds, spread * 3, photo)
                mixed[policy] = {"scans_per_s": rate, "of_capacity": rate / total, "p95_ms": pct(lat, 0.95),
                                 "failed": failed, "cpu_busy": busy}
                target = "" if policy != "least_loaded" else \
                    f" (target >= 0.9: {'met' if rate / total >= 0.9 else 'MISSED'})"
                say(f"one of four 3x slower, {policy}, 1 worker, {clients} clients: {rate:.2f} scans/s, "
                    f"{rate / total:.3f} of the four's capacity{target}, p95 {pct(lat, 0.95):.0f} ms, failed {failed}")

        # Under load: one replica joins, then one leaves.
        gw_port = port_free_on_all(["127.0.0.1"])
        zone.set(NAME, HOSTS[:2])
        churn: dict = {}
        with gateway(gw_port, port, dns, 2, log) as url:
            wait_replicas(url, 2)
            clients = math.ceil(one * 3)

            async def churning() -> tuple[list[float], int]:
                load = asyncio.create_task(closed_loop(url, clients, 0, 3 * warmup_s + 3 * service_s, spread, photo))
                await asyncio.sleep(warmup_s)
                before = await asyncio.to_thread(served, HOSTS[2], port)
                zone.set(NAME, HOSTS[:3])
                added = time.monotonic()
                while await asyncio.to_thread(running_or_served, HOSTS[2], port, before) is False:
                    await asyncio.sleep(0.02)
                churn["join_s"] = time.monotonic() - added
                await asyncio.sleep(warmup_s)
                zone.set(NAME, HOSTS[1:3])
                removed = time.monotonic()
                while await asyncio.to_thread(idle, HOSTS[0], port) is False:
                    await asyncio.sleep(0.05)
                churn["left_idle_s"] = time.monotonic() - removed
                return await load

            _, failed = asyncio.run(churning())
            churn["failed"] = failed
            churn["clients"] = clients
            say(f"a replica added under load (2 workers, {clients} clients) took its first request "
                f"{churn['join_s']:.2f} s after its DNS record appeared (target <= 2 probe intervals, "
                f"{2 * PROBE_INTERVAL_S:g} s: {'met' if churn['join_s'] <= 2 * PROBE_INTERVAL_S else 'MISSED'})")
            say(f"a replica removed under load had finished its requests {churn['left_idle_s']:.2f} s after its "
                f"record went; requests failed during the whole run: {failed} (target 0: "
                f"{'met' if failed == 0 else 'MISSED'})")

    info = machine()
    say(f"commit {info['commit']}; {info['cores']} CPUs ({info['cpu']}); gateway default settings but "
        f"SCANNER_UPSTREAMS=dns+http://{NAME}:PORT, SCANNER_DNS_SERVER, SCANNER_MODEL=fake")
    base.with_suffix(".json").write_text(json.dumps({
        "machine": info, "service_s": service_s, "knee": knee, "seats": seats, "seconds": seconds,
        "one_replica_capacity": capacity, "steps": [asdict(s) for s in steps], "one_slow_of_four": mixed,
        "churn": churn}, indent=1))
    base.with_suffix(".md").write_text(
        f"# Scale-out: FAKE ENGINES with a GPU's capacity curve\n\n`{info['command']}` at {info['commit']}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}\n\n```\n" + "\n".join(lines) + "\n```\n")
    console.print(f"wrote {base.with_suffix('.md')}")


def running_or_served(host: str, port: int, before: float) -> bool:
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
    running = float(re.search(r"^vllm:num_requests_running (\S+)$", text, re.MULTILINE).group(1))
    return running > 0 or served(host, port) > before


def idle(host: str, port: int) -> bool:
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
    return float(re.search(r"^vllm:num_requests_running (\S+)$", text, re.MULTILINE).group(1)) == 0 and \
        float(re.search(r"^vllm:num_requests_waiting (\S+)$", text, re.MULTILINE).group(1)) == 0


if __name__ == "__main__":
    typer.run(main)

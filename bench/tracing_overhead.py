"""Tracing's cost to the relay: `bench/passthrough.py` (default settings) with tracing off
and on, alternately, in one run.

    .venv/bin/python -m bench.tracing_overhead [--rounds 2]

On: OTEL_EXPORTER_OTLP_ENDPOINT points at an OTLP/HTTP sink started here (it answers
200 and drops the spans), once with the gateway's default sampler (parent-based, a tenth
of the requests that come without a decision) and once with every request traced
(OTEL_TRACES_SAMPLER=parentbased_always_on, the most it can cost). Each passthrough run measures the gateway
against the FAKE ENGINE straight, so the machine's drift between runs cancels in each
ratio; the figure is traced ratio / untraced ratio (target >= 0.95x), and the gateway CPU
per request either way.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import typer

from bench.common import ROOT, exit_on_sigterm, git_commit

_FIGURES = re.compile(r"(wrk|h2load): gateway/direct req/s = ([\d.]+);.*?gateway CPU = ([\d.]+) ms/request")


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def passthrough(env: dict[str, str]) -> dict[str, tuple[float, float]]:
    done = subprocess.run([sys.executable, "-m", "bench.passthrough"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)
    flat = re.sub(r"\s+", " ", done.stdout)
    figures = {gen: (float(ratio), float(cpu)) for gen, ratio, cpu in _FIGURES.findall(flat)}
    if done.returncode or len(figures) != 2:
        raise SystemExit(f"passthrough failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return figures


def main(rounds: int = 2) -> None:
    exit_on_sigterm()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}"}
    modes = {"off": {}, "on": traced, "on, every request": {**traced, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}}
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {mode: [] for mode in modes}
    for n in range(1, rounds + 1):
        for mode, env in modes.items():
            runs[mode].append(passthrough(env))
            print(f"round {n}, tracing {mode}: " + ", ".join(
                f"{gen} {ratio:.3f}x, {cpu:.3f} ms/req" for gen, (ratio, cpu) in runs[mode][-1].items()), flush=True)
    print(f"\ncommit {git_commit()}; {rounds} rounds, alternating; FAKE ENGINE 50 ms, c=64, 100 KB bodies")
    for gen in ("wrk", "h2load"):
        off = statistics.mean(r[gen][0] for r in runs["off"])
        cpu_off = statistics.mean(r[gen][1] for r in runs["off"])
        print(f"{gen}: untraced {off:.3f}x direct, {cpu_off:.3f} ms/req")
        for mode in ("on", "on, every request"):
            on = statistics.mean(r[gen][0] for r in runs[mode])
            cpu_on = statistics.mean(r[gen][1] for r in runs[mode])
            target = " (target >= 0.95: " + ("met" if on / off >= 0.95 else "MISSED") + ")" if mode == "on" else ""
            print(f"{gen}: tracing {mode}: {on:.3f}x direct, {cpu_on:.3f} ms/req; "
                  f"traced/untraced req/s = {on / off:.3f}{target}")
    sink.shutdown()


if __name__ == "__main__":
    typer.run(main)

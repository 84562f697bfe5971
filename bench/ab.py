"""gateway against vllm-direct, paired: the gateway's cost next to its ceiling, with the machine's drift cancelled.

    .venv/bin/python -m bench.ab --max-items 1                    # both views, c=4,8,16, 4 rounds (~35 min on 2 cores)
    .venv/bin/python -m bench.ab --views same-budget --levels 16 --rounds 2 --seconds 20 --out quick

compare.py runs each of its four systems once per level, in an order that rotates per
level. On a shared 2-core VM one 40 s level drifts by ~5% with what ran just before it
(measured: whichever system ran right after seed-after's c=16 level lost ~5%, and in
compare.py's rotation that is always the gateway), as much as the gap the 0.95x target
leaves. This runs only the two systems that share the engine, in ABBA rounds at each
level (the gateway first in even rounds, vllm-direct first in odd ones, each after the
machine is quiet again), and reports the ratio of their mean throughputs, each round's
paired ratio, and where each answer's CPU went: the gateway, vLLM's API server (HTTP,
image decode and its processor), vLLM's engine core (vision encoder, prefill, decode)
and the load generator itself (which, for vllm-direct, builds the base64 JSON body).

Views, as in compare.py: `same-budget` (photos already at the task's size; vllm-direct
gets the gateway's own prompt and image) and `12mp` (12 MP phone photos; the gateway
sizes them, vllm-direct sends them raw to a vLLM that applies the same budget itself).
vLLM runs as compare.py starts it (caches off). Writes bench/results/<out>.md and .json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
import typer
from rich.progress import Progress

from bench.common import (
    GpuMeter,
    busy_fraction,
    console,
    exit_on_sigterm,
    free_port,
    machine,
    pct,
    results_base,
    settle,
    start,
    stop,
    wait_http,
)
from bench.scan_load import (
    SCAN_FORM,
    Send,
    capped_prompts,
    closed_loop,
    direct_sender,
    multipart,
    photo_sets,
    raw_direct_sender,
    start_engine,
)
from scanner_gateway.cli import cache_dir, ensure_dev_model
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.scan.tasks import TaskRegistry

SYSTEMS = ("gateway", "vllm-direct")
VIEWS = ("same-budget", "12mp")
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Run:
    view: str
    concurrency: int
    round: int
    system: str
    position: int  # 0: ran first in its round
    qps: float  # answers/s in the steady window (compare.closed_loop)
    p50_ms: float
    p95_ms: float
    answers: int
    errors: int
    cpu_ms_per_answer: dict[str, float]  # by process group


class ProcessCpu:
    """CPU seconds (user + system) used so far by the processes each answer passes through."""

    def __init__(self, gateway_pid: int, engine_pid: int | None) -> None:
        self.gateway = psutil.Process(gateway_pid)
        self.engine_api = psutil.Process(engine_pid) if engine_pid else None  # None: an engine not on this machine
        self.load_generator = psutil.Process(os.getpid())

    @staticmethod
    def _seconds(procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def read(self) -> dict[str, float]:
        seconds = {"gateway": self._seconds([self.gateway, *self.gateway.children(recursive=True)])}
        if self.engine_api is not None:
            seconds["vLLM API"] = self._seconds([self.engine_api])
            seconds["vLLM engine core"] = self._seconds(self.engine_api.children(recursive=True))
        seconds["load generator"] = self._seconds([self.load_generator])
        return seconds


def measure(view: str, concurrency: int, rnd: int, system: str, position: int, send: Send,
            seconds: float, cpu: ProcessCpu) -> Run:
    before, started = cpu.read(), time.perf_counter()
    latencies, errors, steady_qps = asyncio.run(closed_loop(send, concurrency, seconds, REQUEST_TIMEOUT_S))
    elapsed, after = time.perf_counter() - started, cpu.read()
    answers = len(latencies)
    return Run(view, concurrency, rnd, system, position,
               steady_qps if steady_qps is not None else answers / elapsed,
               pct(latencies, 0.5) if latencies else float("nan"), pct(latencies, 0.95) if latencies else float("nan"),
               answers, errors, {k: 1000 * (after[k] - before[k]) / max(answers, 1) for k in after})


def summary(runs: list[Run]) -> list[dict]:
    """Per view and level: mean answers/s of each system, the ratio of the means, the
    paired (same round) ratios, latencies and CPU per answer (means over the rounds)."""
    rows = []
    for view in dict.fromkeys(r.view for r in runs):
        for c in dict.fromkeys(r.concurrency for r in runs if r.view == view):
            of = {s: [r for r in runs if (r.view, r.concurrency, r.system) == (view, c, s)] for s in SYSTEMS}
            paired = [g.qps / d.qps for g, d in zip(of["gateway"], of["vllm-direct"], strict=True) if d.qps]
            direct_mean = statistics.mean(r.qps for r in of["vllm-direct"])
            row = {"view": view, "concurrency": c, "rounds": len(paired), "paired_ratios": paired,
                   "ratio_of_means": statistics.mean(r.qps for r in of["gateway"]) / direct_mean
                   if direct_mean else float("nan")}  # nan: vllm-direct answered nothing
            for s in SYSTEMS:
                qps = [r.qps for r in of[s]]
                row[s] = {"qps_mean": statistics.mean(qps), "qps_sd": statistics.stdev(qps) if len(qps) > 1 else 0.0,
                          "p50_ms": statistics.mean(r.p50_ms for r in of[s]),
                          "p95_ms": statistics.mean(r.p95_ms for r in of[s]),
                          "errors": sum(r.errors for r in of[s]),
                          "cpu_ms_per_answer": {k: statistics.mean(r.cpu_ms_per_answer[k] for r in of[s])
                                                for k in of[s][0].cpu_ms_per_answer}}
            rows.append(row)
    return rows


def report_lines(rows: list[dict], header: list[str]) -> list[str]:
    lines = [*header, "", "| view | c | gateway answers/s | vllm-direct answers/s | gateway / direct "
             "(ratio of means) | paired ratios, by round | p50 / p95 gateway | p50 / p95 direct | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        g, d = row["gateway"], row["vllm-direct"]
        lines.append(
            f"| {row['view']} | {row['concurrency']} | {g['qps_mean']:.2f} ± {g['qps_sd']:.2f} "
            f"| {d['qps_mean']:.2f} ± {d['qps_sd']:.2f} | **{row['ratio_of_means']:.3f}** "
            f"| {', '.join(f'{x:.2f}' for x in row['paired_ratios'])} "
            f"| {g['p50_ms']:.0f} / {g['p95_ms']:.0f} ms | {d['p50_ms']:.0f} / {d['p95_ms']:.0f} ms "
            f"| {g['errors']} / {d['errors']} |")
    groups = list(rows[0]["gateway"]["cpu_ms_per_answer"]) if rows else []
    lines += ["", "CPU per answer (ms, mean over the rounds), by process:", "",
              "| view | c | system | " + " | ".join(groups) + " | all |",
              "|---|---|---|" + "---|" * (len(groups) + 1)]
    for row in rows:
        for s in SYSTEMS:
            cpu = row[s]["cpu_ms_per_answer"]
            lines.append(f"| {row['view']} | {row['concurrency']} | {s} | "
                         + " | ".join(f"{cpu[k]:.1f}" for k in groups) + f" | {sum(cpu.values()):.1f} |")
    return lines


def main(
    model: str = typer.Option(None, help="Model dir (default: the dev model)."),
    engine_url: str = typer.Option(None, help="Use this running vLLM instead of starting one (caches off, see "
                                              "bench/README.md)."),
    engine_pid: int = typer.Option(None, help="With --engine-url: its `vllm serve` process, for the CPU split."),
    engine_has_budget: bool = typer.Option(
        False, help="The --engine-url vLLM applies product_scan's budget itself (needed for the 12mp view)."),
    levels: str = typer.Option("4,8,16", help="Concurrency levels."),
    rounds: int = typer.Option(4, min=1, help="Rounds per level (ABBA: the order alternates)."),
    seconds: float = typer.Option(30.0, help="Seconds per system per round."),
    views: str = typer.Option(",".join(VIEWS), help="same-budget, 12mp, or both."),
    photos: int = typer.Option(48, help="Distinct photos per view."),
    max_items: int = typer.Option(1, help="Cap product_scan's arrays (0: the task as shipped; as in compare.py)."),
    out: str | None = typer.Option(None, help="Results name under bench/results/ (default: ab-<UTC time>-<commit>; "
                                   "an existing one is never overwritten)."),
) -> None:
    base = results_base(out, "ab")  # refused now, not after the run
    chosen = [v for v in views.split(",") if v]
    if unknown := set(chosen) - set(VIEWS):
        raise typer.BadParameter(f"unknown view(s) {sorted(unknown)}; choose from {VIEWS}", param_hint="--views")
    if engine_url and "12mp" in chosen and not engine_has_budget:
        raise typer.BadParameter("the 12mp view sends raw photos to vLLM, which must apply the task's budget "
                                 "itself: start it with --mm-processor-kwargs (bench/README.md) and pass "
                                 "--engine-has-budget, or choose --views same-budget", param_hint="--views")
    level_list = [int(c) for c in levels.split(",") if c]
    prompts_dir = capped_prompts(max_items) if max_items else default_prompts_dir()
    registry = TaskRegistry.load(prompts_dir)
    task = registry.get("product_scan")
    sized, big = photo_sets(task, photos)
    engine = None if engine_url else start_engine(model or str(ensure_dev_model(cache_dir() / "dev-model")),
                                                  registry, task)
    if engine is not None:
        engine_url, engine_pid = engine.base_url, engine.pid
    gateway: subprocess.Popen | None = None
    try:
        served = httpx.get(f"{engine_url}/v1/models").json()["data"][0]["id"]
        gw_port = free_port()
        gateway_log = Path(tempfile.mkdtemp(prefix="bench-ab-")) / "gateway.log"
        gateway = start([sys.executable, "-m", "scanner_gateway", "serve", "--upstream", engine_url,
                         "--port", str(gw_port)],
                        {"SCANNER_MODEL": served, "SCANNER_DRAIN_S": "0", "SCANNER_ACCESS_LOG": "false",
                         "SCANNER_PROMPTS_DIR": str(prompts_dir),
                         "SCANNER_MAX_QUEUE_WAIT_S": str(REQUEST_TIMEOUT_S)}, log=gateway_log)
        wait_http(f"http://127.0.0.1:{gw_port}/ready")
        cpu = ProcessCpu(gateway.pid, engine_pid)
        finish: Counter = Counter()
        scan_url = f"http://127.0.0.1:{gw_port}/v1/scan"
        senders = {"same-budget": {"gateway": multipart(scan_url, [img.jpeg for img in sized], SCAN_FORM),
                                   "vllm-direct": direct_sender(engine_url, task, served, sized, finish)}}
        if "12mp" in chosen:  # ~3 MB of base64 per raw photo: built only when sent
            senders["12mp"] = {"gateway": multipart(scan_url, big, SCAN_FORM),
                               "vllm-direct": raw_direct_sender(engine_url, task, served, big)}
        runs = abba_rounds(senders, chosen, level_list, rounds, seconds, cpu)
        write_results(base, runs, finish, max_items=max_items, photos=photos, rounds=rounds, seconds=seconds)
    finally:
        if gateway is not None:
            stop(gateway)
        if engine is not None:
            engine.stop()


def abba_rounds(senders: dict[str, dict[str, Send]], views: list[str], levels: list[int], rounds: int,
                seconds: float, cpu: ProcessCpu) -> list[Run]:
    """Every view and level in `rounds` rounds, the systems' order alternating (ABBA)."""
    quiet, gpu = busy_fraction(3.0) + 0.2, GpuMeter()
    runs: list[Run] = []
    with Progress(console=console) as progress:
        bar = progress.add_task("A/B rounds", total=len(views) * len(levels) * rounds * 2)
        for view in views:
            for c in levels:
                for rnd in range(rounds):
                    order = SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]
                    for position, system in enumerate(order):
                        settle(quiet, gpu)
                        run = measure(view, c, rnd, system, position, senders[view][system], seconds, cpu)
                        runs.append(run)
                        progress.console.print(f"{view} c={c} round {rnd} {system}: {run.qps:.2f} answers/s, "
                                               f"p95 {run.p95_ms:.0f} ms, {run.errors} errors")
                        progress.advance(bar)
    return runs


def write_results(base: Path, runs: list[Run], finish: Counter, *, max_items: int, photos: int, rounds: int,
                  seconds: float) -> None:
    rows = summary(runs)
    header = [
        "# bench/ab.py: gateway against vllm-direct, paired rounds on one engine",
        "",
        f"Machine: {json.dumps(machine())}.",
        f"product_scan, arrays capped at {max_items or 'the shipped maxItems'} (--max-items); {photos} distinct "
        f"photos per view; vLLM caches off; {rounds} rounds of {seconds:g} s per system and level, ABBA order; "
        "answers/s counted in the steady window (every client past its first answer). "
        f"vllm-direct's finish reasons: {dict(finish)}.",
    ]
    lines = report_lines(rows, header)
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    base.with_suffix(".json").write_text(json.dumps(
        {"machine": machine(), "max_items": max_items, "photos": photos, "seconds": seconds, "rounds": rounds,
         "vllm_direct_finish_reasons": dict(finish), "summary": rows, "runs": [asdict(r) for r in runs]},
        indent=1))
    console.print("\n".join(lines[len(header):]))
    console.print(f"wrote {base.with_suffix('.md')} and .json")


if __name__ == "__main__":
    exit_on_sigterm()
    typer.run(main)

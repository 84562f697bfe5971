"""The original design's table, measured side by side in one run on one machine.

    .venv/bin/python -m bench.compare                        # full CPU run, dev model (~40 min on 2 cores)
    .venv/bin/python -m bench.compare --model DIR --load-format dummy   # a GPU box (bench/README.md)

Four systems, the same model, the same synthetic shelf photos (48 distinct ones, cycled;
vLLM's prefix and processor caches off, so no repeat is answered from a cache), the same task (product_scan, English prompt) and greedy decoding:

    seed-before   one synchronous process, one request at a time, transformers generate
    seed-after    async FastAPI + decode thread pool + hand-made batcher (4 / 100 ms), transformers
    gateway       scanner gateway in front of vLLM (schema-constrained JSON)
    vllm-direct   the gateway's own prompt and image sent straight to vLLM (the ceiling)

Two views: the same pixel budget (every system gets photos already sized to the task's
budget: architecture only), and as designed, with 12 MP phone photos: the seed hands the
full photo to its processor; the gateway sizes it to the task's budget; vllm-direct
sends the raw photo to vLLM, whose processor sizes it to the same budget server-side
(`--mm-processor-kwargs '{"size": ...}'`, set on the engine this bench starts; an engine
of your own (--engine-url) needs the same flag and --engine-has-budget).

Output length: vLLM stops when the JSON is complete; the transformers systems (random
weights never stop) generate exactly the mean completion length vLLM produced in a
calibration run, so every system does the same work per request on average. Random
weights fill every array to its maxItems (24 products: ~2900 tokens, seconds of decoding
per scan on a CPU); `--max-items N` caps the task's arrays for every system alike (N=1:
~130 tokens, the regime where image work dominates, as with a real model's short answers).

For each system: latency at concurrency 1; a closed-loop concurrency sweep (1, 2, 4, ...)
whose best throughput with p95 <= SLO and errors <= 1% is "max QPS" (answers/s in the
steady window, after every client's first answer). The systems take turns at each level
(gateway and vllm-direct back to back, which goes first alternating; the seeds rotated),
so slow drift of the shared machine hits all of them alike. Then an open
loop at 10x that rate: the error rate (non-200 or no answer within 2x SLO) and the answers
within the SLO per second; the gateway runs it with admission sized from its own sweep, as
an operator would (in-flight cap = the knee's concurrency). CPU utilisation of the machine
during the max-QPS level; GPU utilisation and memory through NVML when present.
Writes bench/results/<name>.md, .json and .png.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.progress import Progress

from bench.common import (
    CpuMeter,
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
    RESOLUTIONS,
    SCAN_FORM,
    WARM_UP_CONCURRENCY,
    WARM_UP_REQUESTS,
    Send,
    TokenTally,
    capped_prompts,
    closed_loop,
    direct_sender,
    multipart,
    open_loop,
    photo_sets,
    raw_direct_sender,
    start_engine,
    warm_up,
)
from scanner_gateway.cli import cache_dir, ensure_dev_model
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.engine.launcher import ManagedEngine
from scanner_gateway.scan.images import NormalizedImage
from scanner_gateway.scan.service import build_messages, build_payload
from scanner_gateway.scan.tasks import Task, TaskRegistry

SYSTEMS = ("seed-before", "seed-after", "gateway", "vllm-direct")


@dataclass
class Level:
    concurrency: int
    qps: float  # answers/s in the steady window (every client past its first answer)
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu_util: float
    gpu_util: float | None = None
    gpu_mem_gib: float | None = None
    steady: bool = True  # False: the level was too short for a steady window; qps is answers / wall time


@dataclass
class SystemResult:
    name: str
    unloaded: Level | None = None
    sweep: list[Level] = field(default_factory=list)
    max_qps: float = 0.0
    at_max: Level | None = None
    overload_rate: float = 0.0
    overload_error_rate: float = 0.0
    overload_outcomes: dict[str, int] = field(default_factory=dict)  # "200", "429", "5xx", "timeout", ...
    overload_goodput: float = 0.0  # answers within the SLO per second, from the 10x run's start to its last answer
    overload_elapsed_s: float = 0.0
    overload_p95_ms: float | None = None  # of the answers (200s) during the 10x run
    overload_settings: dict[str, str] = field(default_factory=dict)  # how the system was configured for it
    overload_note: str = ""  # e.g. the engine died under it
    prompt_tokens: float | None = None  # per answer, as the system reported them
    completion_tokens: float | None = None

    def add(self, level: Level, slo_s: float) -> bool:
        """Record a level; False once it breaks the SLO (higher levels only add waiting).

        No stop at an apparent knee: one level's throughput is noisy on a shared box, and
        a dip that is noise would end the sweep before the real peak."""
        if self.unloaded is None:
            self.unloaded = level
        else:
            self.sweep.append(level)
        meets = level.p95_ms <= slo_s * 1000 and level.errors <= 0.01 * max(level.requests, 1)
        if meets and level.qps > self.max_qps:
            self.max_qps, self.at_max = level.qps, level
        return meets


def measure(send: Send, concurrency: int, seconds: float, timeout_s: float, gpu: GpuMeter) -> Level:
    cpu, stop, gpu_out = CpuMeter(), threading.Event(), {}
    sampler = threading.Thread(target=gpu.sample_while, args=(stop, gpu_out))
    sampler.start()
    cpu.start()
    started = time.perf_counter()
    latencies, errors, steady_qps = asyncio.run(closed_loop(send, concurrency, seconds, timeout_s))
    elapsed = time.perf_counter() - started
    util = cpu.stop()
    stop.set()
    sampler.join()
    qps = steady_qps if steady_qps is not None else len(latencies) / elapsed
    return Level(concurrency, qps, statistics.mean(latencies) if latencies else float("nan"),
                 pct(latencies, 0.5), pct(latencies, 0.95), pct(latencies, 0.99), errors,
                 len(latencies) + errors, util, gpu_out.get("util"), gpu_out.get("mem"), steady_qps is not None)


def sweep(senders: dict[str, Send], *, levels: list[int], seconds: float, slo_s: float, gpu: GpuMeter,
          quiet: float, progress: Progress, log: Path) -> dict[str, SystemResult]:
    """Every system at c=1, then at each concurrency level, the systems taking turns
    (`turn_order`) so slow drift of a shared machine hits them all alike. A system leaves
    the sweep once a level breaks its SLO. Each level is appended to `log` (JSON lines)
    as it ends: a run cut short (a lent GPU's time running out) keeps what it measured."""
    results = {name: SystemResult(name) for name in senders}
    bars = {name: progress.add_task(name, total=len(levels) + 1) for name in senders}
    active = list(senders)
    for step, concurrency in enumerate([1, *levels]):
        for name in turn_order(active, step):
            settle(quiet, gpu)
            level = measure(senders[name], concurrency, seconds, slo_s * 2, gpu)
            with log.open("a") as out:
                out.write(json.dumps({"system": name, **asdict(level)}) + "\n")
            progress.advance(bars[name])
            if not results[name].add(level, slo_s):
                active.remove(name)
                progress.update(bars[name], completed=len(levels) + 1)
    return results


PAIRED = ("gateway", "vllm-direct")


def turn_order(active: list[str], step: int) -> list[str]:
    """The order of one level: gateway and vllm-direct back to back, which of them goes
    first alternating per level, then the other systems in rotating order.

    Adjacent, the two whose ratio the targets compare see the same machine; the system
    that runs right after another's level pays for it (measured: ~5% after seed-after's
    c=16 level, ab.py); across levels that place falls to each of the pair alike.
    """
    pair = [name for name in active if name.split(" (")[0] in PAIRED]
    if step % 2:
        pair.reverse()
    rest = [name for name in active if name not in pair]
    # Rotating every second level: with two seeds, a rotation per level would hand the
    # place after the same seed to the same one of the pair at every level.
    turn = (step // 2) % len(rest) if rest else 0
    return pair + rest[turn:] + rest[:turn]


def overload_system(result: SystemResult, send: Send, seconds: float, slo_s: float) -> None:
    """Open loop at 10x the system's max QPS; outcomes by kind."""
    result.overload_rate = 10 * max(result.max_qps, 0.1)
    outcomes, answered, elapsed = asyncio.run(open_loop(send, result.overload_rate, seconds, slo_s * 2))
    result.overload_outcomes = dict(outcomes)
    result.overload_error_rate = 1 - outcomes["200"] / sum(outcomes.values())
    # Per second until the last answer, not per second of offered load: answers keep
    # coming for up to 2x SLO after the offer stops.
    result.overload_elapsed_s = elapsed
    result.overload_goodput = sum(ms <= slo_s * 1000 for ms in answered) / elapsed
    result.overload_p95_ms = pct(answered, 0.95) if answered else None


def admission_for(result: SystemResult, slo_s: float) -> dict[str, str]:
    """Gateway admission as an operator would set it from the sweep: queue no longer than
    the SLO leaves after the knee's p95. No in-flight cap: the engine's gauges decide."""
    at = result.at_max or result.unloaded
    assert at is not None
    return {"SCANNER_MAX_QUEUE_WAIT_S": f"{max(1.0, slo_s - at.p95_ms / 1000):.1f}"}


def main(
    model: str = typer.Option(None, help="Model dir (default: the dev model)."),
    engine_url: str = typer.Option(None, help="Use this running vLLM instead of starting one."),
    engine_args: str = typer.Option(
        "", help="More `vllm serve` flags for the engine the bench starts (shell words), e.g. on a GPU "
                 "'--load-format dummy --gpu-memory-utilization 0.5'."),
    engine_has_budget: bool = typer.Option(
        False, help="The --engine-url vLLM runs with product_scan's budget in --mm-processor-kwargs "
                    "(then the 12 MP view also sends raw photos straight to it)."),
    seconds: float = typer.Option(30.0, help="Seconds per sweep level."),
    levels: str = typer.Option("2,4,8,16,32", help="Concurrency levels after the c=1 run."),
    slo_s: float = typer.Option(20.0, help="p95 latency SLO for 'max QPS' (seconds)."),
    overload_seconds: float = typer.Option(20.0, help="Length of the 10x overload run."),
    photos: int = typer.Option(48, help="Distinct photos (several resolutions)."),
    systems: str = typer.Option(",".join(SYSTEMS), help="Which systems to run."),
    same_budget: bool = typer.Option(True, help="Run the same-budget view (off: the 12 MP view alone, for a short "
                                                "GPU lease that has the other from an earlier run)."),
    as_designed: bool = typer.Option(True, help="Also run the 12 MP view (gateway, seed-before, vllm-direct raw)."),
    overload: bool = typer.Option(True, help="Run each system at 10x its max QPS (off: a short GPU lease)."),
    out: str | None = typer.Option(None, help="Results name under bench/results/ (default: compare-<UTC time>-<commit>; "
                                   "an existing one is never overwritten)."),
    warm_up_requests: int = typer.Option(WARM_UP_REQUESTS, "--warm-up",
                                         help="Requests each system gets before any is measured, 4 at a time."),
    seed_after_workers: int = typer.Option(4, help="seed-after's worker processes (the seed ran gunicorn -w 4); "
                                           "each holds a model copy: use 1 where four do not fit, and say so."),
    max_items: int = typer.Option(0, help="Cap every array in product_scan's schema at this many items "
                                          "(0: the task as shipped); shorter answers, image work dominates."),
) -> None:
    if not (same_budget or as_designed):
        raise typer.BadParameter("nothing to run: --no-same-budget and --no-as-designed", param_hint="--no-same-budget")
    if engine_url and engine_args:
        raise typer.BadParameter("flags for an engine the bench starts; it starts none with --engine-url",
                                 param_hint="--engine-args")
    run(Options(model=model, engine_url=engine_url, engine_args=engine_args, engine_has_budget=engine_has_budget,
                seconds=seconds, levels=[int(c) for c in levels.split(",") if c], slo_s=slo_s,
                overload_seconds=overload_seconds, photos=photos,
                systems=[s for s in SYSTEMS if s in systems.split(",")], same_budget=same_budget,
                as_designed=as_designed, overload=overload, out=out, warm_up=warm_up_requests,
                seed_after_workers=seed_after_workers, max_items=max_items))


@dataclass
class Options:
    """The run, as the command line asked for it."""

    model: str | None
    engine_url: str | None
    engine_args: str
    engine_has_budget: bool
    seconds: float
    levels: list[int]
    slo_s: float
    overload_seconds: float
    photos: int
    systems: list[str]
    same_budget: bool
    as_designed: bool
    overload: bool
    out: str | None
    warm_up: int
    seed_after_workers: int
    max_items: int


class Servers:
    """The processes a run measures: vLLM (unless given one), the gateway, the seeds."""

    def __init__(self, opts: Options, prompts_dir: Path, model_dir: str) -> None:
        self.opts, self.prompts_dir, self.model_dir = opts, prompts_dir, model_dir
        self.engine: ManagedEngine | None = None
        self.engine_url = opts.engine_url or ""
        self.served = ""
        self.procs: list[subprocess.Popen] = []
        self.gateway: subprocess.Popen | None = None
        self.gw_port = free_port()
        self.gateway_log = Path(tempfile.mkdtemp(prefix="bench-compare-")) / "gateway.log"
        self.gateway_work: Counter = Counter()  # summed over the gateway's restarts
        self.seed_ports: dict[str, int] = {}
        self.seed_procs: dict[str, subprocess.Popen] = {}
        self.out_tokens = 0

    def start_engine(self, registry: TaskRegistry, task: Task) -> None:
        if not self.engine_url:
            self.engine = start_engine(self.model_dir, registry, task, shlex.split(self.opts.engine_args))
            self.engine_url = self.engine.base_url
        self.served = httpx.get(f"{self.engine_url}/v1/models").json()["data"][0]["id"]

    def start_gateway(self, admission: dict[str, str]) -> None:
        """(Re)start the gateway with these admission settings, its counters kept."""
        if self.gateway is not None:
            self.gateway_work.update(gateway_counters(self.gw_port))
            stop(self.gateway)
        self.gateway = start([sys.executable, "-m", "scanner_gateway", "serve", "--upstream", self.engine_url,
                              "--port", str(self.gw_port)],
                             {"SCANNER_MODEL": self.served, "SCANNER_DRAIN_S": "0", "SCANNER_ACCESS_LOG": "false",
                              "SCANNER_PROMPTS_DIR": str(self.prompts_dir), **admission}, log=self.gateway_log)
        self.procs.append(self.gateway)
        wait_http(f"http://127.0.0.1:{self.gw_port}/ready")

    def gateway_work_now(self) -> Counter:
        work = Counter(self.gateway_work)
        work.update(gateway_counters(self.gw_port))
        return work

    def start_seed(self, name: str) -> None:
        self.seed_ports.setdefault(name, free_port())
        workers = ["--workers", str(self.opts.seed_after_workers)] if name == "after" else []
        self.seed_procs[name] = start([sys.executable, "-m", "bench.seed_systems", name, "--model", self.model_dir,
                                       "--port", str(self.seed_ports[name]), "--max-new-tokens", str(self.out_tokens),
                                       *workers])
        self.procs.append(self.seed_procs[name])
        wait_http(f"http://127.0.0.1:{self.seed_ports[name]}/health", timeout=300)

    def restart_seed(self, name: str) -> None:
        """A seed keeps working through its overload backlog after the clients left: restart it."""
        stop(self.seed_procs[name], signal.SIGKILL)
        self.start_seed(name)

    def seed_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.seed_ports.get(name)}/scan"

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)
        if self.engine is not None:
            self.engine.stop()


def calibrate_output_tokens(engine_url: str, task: Task, served: str, sized: list[NormalizedImage]) -> int:
    """How long vLLM's JSON answers are: the transformers seeds generate that many tokens."""
    usage = []
    with httpx.Client(timeout=300) as c:
        for img in sized[:6]:
            payload = build_payload(task, served, build_messages(task, [img], "en"), 1, task.spec.sampling.max_tokens)
            answer = c.post(f"{engine_url}/v1/chat/completions", json=payload)
            if answer.status_code != 200:  # e.g. a config vLLM loads as a pooling model
                raise SystemExit(f"vLLM at {engine_url} cannot answer the task: {answer.status_code} "
                                 f"{answer.text[:500]}")
            usage.append(answer.json()["usage"]["completion_tokens"])
    return round(statistics.mean(usage))


@dataclass
class Workload:
    """What each system is sent, per view, and what came back (tokens, finish reasons)."""

    same_budget: dict[str, Send]
    designed: dict[str, Send]
    tokens: dict[str, TokenTally]
    direct_finish: Counter  # vLLM's finish reasons: "length" = a JSON cut off


def build_workload(servers: Servers, task: Task, sized: list[NormalizedImage], big: list[bytes]) -> Workload:
    tokens: dict[str, TokenTally] = defaultdict(TokenTally)  # by system and view
    finish: Counter = Counter()
    scan_url = f"http://127.0.0.1:{servers.gw_port}/v1/scan"
    sized_bytes = [img.jpeg for img in sized]
    same = {
        "seed-before": multipart(servers.seed_url("before"), sized_bytes, {}, tokens["seed-before"]),
        "seed-after": multipart(servers.seed_url("after"), sized_bytes, {}, tokens["seed-after"]),
        "gateway": multipart(scan_url, sized_bytes, SCAN_FORM, tokens["gateway"]),
        "vllm-direct": direct_sender(servers.engine_url, task, servers.served, sized, finish, tokens["vllm-direct"]),
    }
    designed = {
        "gateway": multipart(scan_url, big, SCAN_FORM, tokens["gateway (12 MP)"]),
        "seed-before": multipart(servers.seed_url("before"), big, {}, tokens["seed-before (12 MP)"]),
    }
    if servers.engine is not None or servers.opts.engine_has_budget:  # else vLLM would see the raw photo whole
        designed["vllm-direct"] = raw_direct_sender(servers.engine_url, task, servers.served, big,
                                                    tokens["vllm-direct (12 MP)"])
    chosen = servers.opts.systems
    return Workload({n: same[n] for n in chosen}, {n: designed[n] for n in designed if n in chosen}, tokens, finish)


@dataclass
class Results:
    same_budget: dict[str, SystemResult] = field(default_factory=dict)
    designed: dict[str, SystemResult] = field(default_factory=dict)

    def views(self) -> tuple[tuple[str, dict[str, SystemResult]], ...]:
        return (("", self.same_budget), (" (12 MP)", self.designed))

    def fill_tokens(self, tokens: dict[str, TokenTally]) -> None:
        for view, runs in self.views():
            for name, result in runs.items():
                if f"{name}{view}" in tokens:
                    result.prompt_tokens, result.completion_tokens = tokens[f"{name}{view}"].means()


def run(opts: Options) -> None:
    prompts_dir = capped_prompts(opts.max_items) if opts.max_items else default_prompts_dir()
    registry = TaskRegistry.load(prompts_dir)
    task = registry.get("product_scan")
    sized, big = photo_sets(task, opts.photos)
    servers = Servers(opts, prompts_dir, opts.model or str(ensure_dev_model(cache_dir() / "dev-model")))
    try:
        servers.start_engine(registry, task)
        servers.out_tokens = calibrate_output_tokens(servers.engine_url, task, servers.served, sized)
        console.print(f"vLLM answers product_scan in {servers.out_tokens} tokens on average: "
                      "the seed systems generate that many")
        console.print(f"gateway log (JSON lines, warnings and errors): {servers.gateway_log}")
        servers.start_gateway({})  # admission at its defaults, as users run it
        for name in ("before", "after"):
            if f"seed-{name}" in opts.systems:
                servers.start_seed(name)
        measure_all(opts, servers, build_workload(servers, task, sized, big))
    finally:
        servers.close()


def measure_all(opts: Options, servers: Servers, work: Workload) -> None:
    base = results_base(opts.out, "compare")
    base.parent.mkdir(parents=True, exist_ok=True)
    level_log = base.with_suffix(".levels.jsonl")
    level_log.write_text("")
    console.print(f"each level as it ends: {level_log}")
    gpu = GpuMeter()
    quiet = busy_fraction(3.0) + 0.2  # what "idle" is here, with every server up
    console.print(f"idle machine: {100 * (quiet - 0.2):.0f}% CPU busy")
    console.print(f"warming up every system alike: {opts.warm_up} requests, {WARM_UP_CONCURRENCY} at a time")
    for send in work.same_budget.values():
        warm_up(send, opts.warm_up)
    for tally in work.tokens.values():
        tally.reset()  # only measured answers count
    results = Results()
    sweep_args = {"levels": opts.levels, "seconds": opts.seconds, "slo_s": opts.slo_s, "gpu": gpu, "log": level_log}
    with Progress(console=console) as progress:
        # Every sweep first, on a quiet machine; the overloads (which leave work behind) last.
        if opts.same_budget:
            results.same_budget = sweep(work.same_budget, quiet=quiet, progress=progress, **sweep_args)
        if opts.as_designed:
            results.designed = {name.removesuffix(" (12 MP)"): result for name, result in sweep(
                {f"{n} (12 MP)": send for n, send in work.designed.items()},
                quiet=quiet, progress=progress, **sweep_args).items()}
        if opts.overload:  # the sweeps' report now: a run cut short in its 10x runs (a lent GPU's time) keeps it
            results.fill_tokens(work.tokens)
            write_report(report(opts, servers, work, results, servers.gateway_work_now(), False),
                         results.same_budget, results.designed, base)
            overload_all(opts, servers, work, results, quiet, gpu, progress)
    results.fill_tokens(work.tokens)
    write_report(report(opts, servers, work, results, servers.gateway_work_now(), opts.overload),
                 results.same_budget, results.designed, base)
    level_log.unlink()  # all of it is in the report now


def overload_all(opts: Options, servers: Servers, work: Workload, results: Results, quiet: float, gpu: GpuMeter,
                 progress: Progress) -> None:
    bar = progress.add_task("10x overload runs", total=len(results.same_budget) + len(results.designed))
    for runs, send_of in ((results.same_budget, work.same_budget), (results.designed, work.designed)):
        for name, result in runs.items():
            if name == "gateway":
                result.overload_settings = admission_for(result, opts.slo_s)
                servers.start_gateway(result.overload_settings)
            settle(quiet, gpu)
            overload_system(result, send_of[name], opts.overload_seconds, opts.slo_s)
            if name.startswith("seed-"):
                servers.restart_seed(name.removeprefix("seed-"))
            else:
                # The engine works on through the backlog after the clients gave up (and
                # has been OOM-killed doing so): wait for it here, so that its fate is put
                # down to the run that left the backlog, not to the next or to none.
                settle(quiet, gpu)
                restart_engine_if_it_died(servers, name, result)
            progress.advance(bar)


def restart_engine_if_it_died(servers: Servers, name: str, result: SystemResult) -> None:
    engine = servers.engine
    if engine is None or engine.exit_code is None:
        return
    # Unguarded, vLLM takes in every photo it is sent: a 10x burst of 12 MP ones has had
    # its API process OOM-killed here (18 GB). Say so, and go on.
    code = engine.exit_code
    result.overload_note = (f"vLLM exited during this run or the backlog it left (code {code}"
                            + (": SIGKILL, as the kernel's OOM killer sends" if code == -9 else "")
                            + "); restarted for what followed")
    console.print(f"[red]{name}: {result.overload_note}[/red]")
    engine.stop()
    engine.start()
    engine.wait_healthy(900)


def report(opts: Options, servers: Servers, work: Workload, results: Results, gateway_work: Counter,
           overload_done: bool) -> dict:
    return {"machine": machine(), "gateway_work": dict(gateway_work),
            "engine_cache_hits": engine_cache_hits(servers.engine_url),
            "gateway_overload_settings": {view: runs["gateway"].overload_settings
                                          for view, runs in (("same budget", results.same_budget),
                                                             ("12 MP", results.designed))
                                          if "gateway" in runs and runs["gateway"].overload_settings},
            "vllm_direct_finish_reasons": dict(work.direct_finish), "task": "product_scan",
            "max_items": opts.max_items or None, "output_tokens": servers.out_tokens, "slo_p95_s": opts.slo_s,
            "seed_after_workers": opts.seed_after_workers, "warm_up": opts.warm_up,
            "overload_run": overload_done, "overload_pending": opts.overload and not overload_done,
            "same_budget_run": opts.same_budget,
            "seconds_per_level": opts.seconds, "photos": opts.photos, "resolutions": RESOLUTIONS,
            "same_budget": {k: asdict(v) for k, v in results.same_budget.items()},
            "as_designed_12mp": {k: asdict(v) for k, v in results.designed.items()}}


def gateway_counters(port: int) -> Counter:
    """Scans (and their outcomes other than ok), retried scans and invalid answers so far,
    from the gateway's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples = [smp for fam in text_string_to_metric_families(text) for smp in fam.samples]
    counts = Counter({
        name: sum(smp.value for smp in samples if smp.name == metric)
        for name, metric in (("scans", "scanner_scans_total"), ("retried", "scanner_scan_retries_total"),
                             ("invalid_answers", "scanner_structured_output_failures_total"))
    })
    for smp in samples:
        if smp.name == "scanner_scans_total" and smp.labels["outcome"] != "ok":
            counts[f"outcome {smp.labels['outcome']}"] += smp.value
    # How long the gateway's event loop waited to run (blocked or starved of CPU).
    lag = {(smp.name, smp.labels.get("le")): smp.value for smp in samples
           if smp.name.startswith("scanner_event_loop_lag_seconds")}
    counts["loop_late_s"] = lag.get(("scanner_event_loop_lag_seconds_sum", None), 0.0)
    counts["loop_late_over_1s"] = (lag.get(("scanner_event_loop_lag_seconds_count", None), 0.0)
                                   - lag.get(("scanner_event_loop_lag_seconds_bucket", "1.0"), 0.0))
    return counts


def engine_cache_hits(engine_url: str) -> dict[str, float | None]:
    """vLLM's prefix- and processor-cache hit rates over the run (None: not queried), so a
    reader can check that no answer came from a cache. Empty: the engine did not answer."""
    try:
        text = httpx.get(f"{engine_url}/metrics").text
    except httpx.HTTPError:
        return {}
    totals: Counter = Counter()
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith(("vllm:prefix_cache_", "vllm:mm_cache_")) and smp.name.endswith("_total"):
                totals[smp.name.removesuffix("_total")] += smp.value
    return {kind: (totals[f"vllm:{kind}_hits"] / totals[f"vllm:{kind}_queries"]
                   if totals[f"vllm:{kind}_queries"] else None) for kind in ("prefix_cache", "mm_cache")}


def _fmt(v: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if v is None or v != v else f"{v:{spec}}{unit}"


def table(results: dict[str, SystemResult]) -> list[str]:
    names = list(results)
    rows = [
        ("average response time (c=1)", lambda r: _fmt(r.unloaded.avg_ms, ".0f", " ms")),
        ("p95 / p99 (c=1)", lambda r: f"{_fmt(r.unloaded.p95_ms)} / {_fmt(r.unloaded.p99_ms)} ms"),
        ("max QPS (p95 within SLO)", lambda r: _fmt(r.max_qps, ".2f")),
        ("p95 / p99 at max QPS", lambda r: f"{_fmt(r.at_max.p95_ms if r.at_max else None)} / "
                                           f"{_fmt(r.at_max.p99_ms if r.at_max else None)} ms"),
        ("concurrency at max QPS", lambda r: str(r.at_max.concurrency) if r.at_max else "n/a"),
        ("prompt / completion tokens per answer", lambda r: f"{_fmt(r.prompt_tokens)} / {_fmt(r.completion_tokens)}"),
        ("CPU utilisation at max QPS", lambda r: _fmt(r.at_max.cpu_util * 100 if r.at_max else None, ".0f", "%")),
        ("GPU utilisation at max QPS", lambda r: _fmt(r.at_max.gpu_util * 100 if r.at_max and r.at_max.gpu_util
                                                      is not None else None, ".0f", "%")),
        ("error rate at 10x capacity", lambda r: f"{r.overload_error_rate * 100:.1f}% (of {r.overload_rate:.1f} req/s)"
                                        if r.overload_rate else "not run"),
    ]
    overload_rows = [
        ("of which 429 / 5xx / timeout / refused", lambda r: " / ".join(
            str(r.overload_outcomes.get(k, 0)) for k in ("429", "5xx", "timeout", "connection"))),
        ("answers within SLO at 10x (per s, to the last answer)", lambda r: _fmt(r.overload_goodput, ".2f")),
        ("p95 of answers at 10x", lambda r: _fmt(r.overload_p95_ms, ".0f", " ms")),
    ]
    if any(r.overload_rate for r in results.values()):  # else (--no-overload) the row above says "not run"
        rows += overload_rows
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(results[n]) for n in names) + " |" for label, fn in rows]
    return lines


def ratios(results: dict[str, SystemResult]) -> list[str]:
    def q(name: str) -> float:
        return results[name].max_qps if name in results else float("nan")
    out = []
    for a, b in (("gateway", "vllm-direct"), ("gateway", "seed-before"), ("gateway", "seed-after")):
        if a in results and b in results and q(b) > 0:
            out.append(f"- max QPS {a} / {b} = {q(a) / q(b):.2f}")
    return out


def write_report(report: dict, results: dict[str, SystemResult], designed: dict[str, SystemResult], base: Path) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    m = report["machine"]
    md = [f"# bench/compare.py: {report['task']}, same model, same photos, one run",
          "",
          f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPUs: {', '.join(m['gpus']) or 'none'}; "
          f"vLLM CPU reserve: {m['vllm_cpu_reserved_cpu']}.",
          f"Output: {report['output_tokens']} tokens per answer on average (vLLM's JSON"
          + (f", product_scan's arrays capped at {report['max_items']} item(s) (--max-items)" if report.get("max_items") else "")
          + "; the transformers systems "
          f"generate exactly that many). SLO for max QPS: p95 <= {report['slo_p95_s']:g} s and <= 1% errors; "
          f"{report['seconds_per_level']:g} s per concurrency level, the systems taking turns at each level; "
          "QPS = answers/s once every client had its first answer (ramp-up left out); "
          f"{report['photos']} distinct photos. Every system got the same warm-up first ({report['warm_up']} "
          f"requests, {WARM_UP_CONCURRENCY} at a time); seed-after ran {report['seed_after_workers']} worker "
          "process(es), each with its model and batcher.",
          "Gateway admission: its defaults in the sweeps (no in-flight cap: it sends only into free engine "
          "seats, by the engine's gauges). "
          + (f"In the 10x runs, queue wait = SLO - the knee's p95: {report['gateway_overload_settings']}."
           if report["overload_run"] else "The 10x runs had not finished when this was written (the sweeps' report)."
           if report.get("overload_pending") else "No 10x runs (--no-overload)."),
          f"Answer validity: the gateway retried {report['gateway_work']['retried']:.0f} of "
          f"{report['gateway_work']['scans']:.0f} scans (answers cut at max_tokens or invalid: it asks again "
          f"with twice the tokens); vllm-direct's finish reasons {report['vllm_direct_finish_reasons']} "
          "(every 200 counted as a success, cut or not).",
          "vLLM cache hit rates over the run (prefix cache, multimodal-processor cache; the bench starts "
          "its engine with both off, a repeat must not be answered from a cache): "
          + (f"{ {k: (f'{v:.1%}' if v is not None else 'off') for k, v in report['engine_cache_hits'].items()} }"
             if report.get("engine_cache_hits") else "not read: the engine did not answer at the end") + ".",
          "Gateway scans that did not end ok, by error code (429s included): "
          f"{ {k.removeprefix('outcome '): int(v) for k, v in report['gateway_work'].items() if k.startswith('outcome ')} }.",
          f"Gateway event loop: {report['gateway_work']['loop_late_s']:.0f} s late in all (its timers' lateness, "
          f"summed), {report['gateway_work']['loop_late_over_1s']:.0f} wake-ups more than 1 s late: time the "
          "gateway process waited to run (blocked, or starved of CPU by the engine on a small machine), "
          "included in its latencies.",
          "", "## Same pixel budget (architecture only: every system gets the photo already sized to the task's budget)",
          "", *(table(results) + ["", *ratios(results)] if results else ["Not run (--no-same-budget)."])]
    if designed:
        md += ["", "## As designed, 12 MP phone photos (the seed hands the full photo to the processor; "
                   "the gateway applies the task's pixel budget; vllm-direct sends the raw photo and vLLM "
                   "applies the same budget server-side)", "", *table(designed), ""]
        for peer, target in (("seed-before", "10x"), ("vllm-direct", "1.5x")):
            if "gateway" not in designed or peer not in designed:
                continue
            gateway, other = designed["gateway"], designed[peer]
            if other.max_qps > 0:
                md.append(f"- max QPS gateway / {peer} = {gateway.max_qps / other.max_qps:.2f} (target {target})")
            elif other.unloaded is not None and other.unloaded.qps > 0:
                md.append(f"- {peer} misses the SLO even at c=1 (p95 {other.unloaded.p95_ms / 1000:.1f} s): no max "
                          f"QPS; gateway max QPS / {peer}'s c=1 throughput = "
                          f"{gateway.max_qps / other.unloaded.qps:.2f} (target {target})")
    md += [f"- {name}'s 10x run ({view}): {r.overload_note}" for view, runs in (("same budget", results), ("12 MP", designed))
           for name, r in runs.items() if r.overload_note]
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(results, designed, base.with_suffix(".png"))
    console.print("\n".join(md))
    console.print(f"written: {base}.md / .json / .png")


def plot(results: dict[str, SystemResult], designed: dict[str, SystemResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, series in [*results.items(), *((f"{k} (12 MP)", v) for k, v in designed.items())]:
        levels = [series.unloaded, *series.sweep]
        ax.plot([lv.qps for lv in levels], [lv.p95_ms / 1000 for lv in levels], marker="o", label=label,
                linestyle="--" if "12 MP" in label else "-")
    ax.set_xlabel("throughput (scans/s)")
    ax.set_ylabel("p95 latency (s)")
    ax.set_title("Latency vs throughput, product_scan, one machine")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    typer.run(main)

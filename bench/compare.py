"""The original design's table, measured side by side in one run on one machine.

    .venv/bin/python bench/compare.py                        # full CPU run, dev model (~40 min on 2 cores)
    .venv/bin/python bench/compare.py --model DIR --load-format dummy   # a GPU box (bench/README.md)

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
import base64
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import Progress

from scanner_gateway.cli import DEV_MAX_MODEL_LEN, cache_dir, ensure_dev_model
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, EngineOptions, ManagedEngine
from scanner_gateway.scan.images import NormalizedImage, normalize_image
from scanner_gateway.scan.service import build_messages, build_payload
from scanner_gateway.scan.tasks import Task, TaskRegistry
from scanner_gateway.synthetic import shelf_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import pct  # noqa: E402
from passthrough import free_port, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The photos cycle, so vLLM's prefix and multimodal-processor caches would answer repeats
# (93% prefix hits, 100% processor hits, measured): a workload no store sends. Off, every
# request pays its image work, as with real, always-new photos.
CACHES_OFF = ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
SYSTEMS = ("seed-before", "seed-after", "gateway", "vllm-direct")
console = Console()


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


class CpuMeter:
    """Machine-wide CPU busy fraction between start() and stop() (/proc/stat)."""

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> float:
        busy, total = (a - b for a, b in zip(self._read(), self._t0, strict=True))
        return busy / total if total else 0.0


class GpuMeter:
    """Mean GPU utilisation and peak memory while running, through NVML; None without a GPU."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:
            self.handles = []

    def sample_while(self, stop: threading.Event, out: dict) -> None:
        utils, mem = [], 0.0
        while not stop.wait(0.2):
            for h in self.handles:
                utils.append(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100)
                mem = max(mem, self.nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
        out.update(util=statistics.mean(utils) if utils else None, mem=mem or None)

    def busy(self) -> float:
        """The busiest GPU's utilisation now (NVML's last sample period); 0 without one."""
        return max((self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in self.handles), default=0.0)


Send = Callable[[httpx.AsyncClient, int], Awaitable[int]]  # -> HTTP status
WARM_UP_REQUESTS, WARM_UP_CONCURRENCY = 8, 4  # every system alike; 4 at a time reaches each seed-after worker


@dataclass
class TokenTally:
    """Prompt and completion tokens of a system's answers, as it reports them (the
    gateway's and vLLM's `usage`, the seeds' own count): the same-budget claim, shown."""
    answers: int = 0
    prompt: int = 0
    completion: int = 0

    def add(self, usage: dict | None) -> None:
        if usage:
            self.answers += 1
            self.prompt += usage.get("prompt_tokens", 0)
            self.completion += usage.get("completion_tokens", 0)

    def reset(self) -> None:
        self.answers = self.prompt = self.completion = 0

    def fill(self, result: SystemResult) -> None:
        if self.answers:
            result.prompt_tokens, result.completion_tokens = self.prompt / self.answers, self.completion / self.answers


def warm_up(send: Send, requests: int = WARM_UP_REQUESTS, concurrency: int = WARM_UP_CONCURRENCY) -> None:
    """Requests not measured, so no system's first (cold) answers land in its figures."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=900) as client:
            async def worker(w: int) -> None:
                for i in range(w, requests, concurrency):
                    await send(client, i)
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
    asyncio.run(run())


async def closed_loop(send: Send, concurrency: int, seconds: float, timeout_s: float) -> tuple[list[float], int, float | None]:
    """Latencies (ms) of the 200s, errors, and the answers/s in the steady window.

    The steady window runs from the moment every client has had its first answer (the
    start-up ramp is over) to the end of the level; requests still running then finish
    and count in the latencies, not in the throughput. None: the window was too short
    or held fewer answers than clients.
    """
    latencies: list[float] = []
    answered_at: list[float] = []
    first_answer: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    ok = await send(client, i) == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if ok:
                    latencies.append((t1 - t0) * 1000)
                    answered_at.append(t1)
                else:
                    errors += 1
                if i == w:
                    first_answer.append(t1)
                i += concurrency
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    steady_from = max(first_answer) if len(first_answer) == concurrency else stop
    in_window = sum(steady_from < t <= stop for t in answered_at)
    # Fewer answers than clients in the window is too coarse a count to call a rate
    # (a slow engine on a short level can land none at all).
    if stop - steady_from < seconds / 4 or in_window < concurrency:
        return latencies, errors, None
    return latencies, errors, in_window / (stop - steady_from)


async def open_loop(send: Send, rate: float, seconds: float, timeout_s: float) -> tuple[Counter, list[float], float]:
    """Outcomes ("200", "429", "5xx", "timeout", "connection", "4xx") offering `rate`
    requests/s, the latencies (ms) of the 200s, and the seconds until the last outcome."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    answered: list[float] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def one(i: int) -> str:
            t0 = time.perf_counter()
            try:
                status = await send(client, i)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError:
                return "connection"
            if status == 200:
                answered.append((time.perf_counter() - t0) * 1000)
            return "200" if status == 200 else "429" if status == 429 else f"{status // 100}xx"
        tasks = []
        started = time.perf_counter()
        for i in range(max(1, int(rate * seconds))):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        outcomes = Counter(await asyncio.gather(*tasks))
        return outcomes, answered, time.perf_counter() - started


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


def busy_fraction(seconds: float = 1.0) -> float:
    meter = CpuMeter()
    meter.start()
    time.sleep(seconds)
    return meter.stop()


GPU_IDLE = 0.05  # utilisation under which a GPU counts as idle between levels


def settle(idle_below: float, gpu: GpuMeter, max_s: float = 180.0) -> None:
    """Wait until the machine is quiet: work a system queued during overload (and keeps
    doing after its clients gave up) must not slow the next measurement. The GPU too: a
    seed whose clients timed out works through its backlog there on one CPU core, which
    the CPU check alone missed (likely what cut the gateway's c=64 level below its c=16
    one, GPU 97% busy, in results/compare-h200-12mp)."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        if busy_fraction() < idle_below and gpu.busy() < GPU_IDLE:
            return
    console.print(f"[yellow]machine still busy after {max_s:g} s; going on")


def git_commit() -> str:
    """The code measured: HEAD's short hash, "-dirty" when the tree has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def results_base(out: str | None, prefix: str) -> Path:
    """Where a run writes its files: `out`, by default a name of its own (prefix, UTC time,
    commit); never over results already there (committed ones included)."""
    name = out or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{git_commit()}"
    base = ROOT / "bench" / "results" / name
    taken = [p.name for p in (base.with_suffix(".md"), base.with_suffix(".json")) if p.exists()]
    if taken:
        raise typer.BadParameter(f"{', '.join(taken)} already exist(s): results are never overwritten; "
                                 "pass another --out")
    return base


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    gpus = []
    gm = GpuMeter()
    for h in gm.handles:
        gpus.append(gm.nvml.nvmlDeviceGetName(h))
    try:
        from importlib.metadata import version
        vllm = version("vllm")
    except Exception:  # noqa: BLE001 - no engine package here: say so, do not fail the report
        vllm = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "gpus": gpus,
            "commit": git_commit(), "vllm": vllm, "command": shlex.join(sys.argv),
            "python": platform.python_version(), "platform": platform.platform(),
            "vllm_cpu_reserved_cpu": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "default (1 core for the API)")}


def start(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """In a session of its own, so `stop` ends its worker processes too (seed-after's)."""
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the whole process group: a supervisor SIGKILLed alone leaves its workers running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait()


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
    prompts_dir = capped_prompts(max_items) if max_items else default_prompts_dir()
    registry = TaskRegistry.load(prompts_dir)
    task = registry.get("product_scan")
    sized, big = photo_sets(task, photos)
    model_dir = model or str(ensure_dev_model(cache_dir() / "dev-model"))
    procs: list[subprocess.Popen] = []
    engine = None
    try:
        if engine_url is None:
            engine = start_engine(model_dir, registry, task, shlex.split(engine_args))
            engine_url = engine.base_url
        served = httpx.get(f"{engine_url}/v1/models").json()["data"][0]["id"]

        direct_finish: Counter = Counter()  # vLLM's finish reasons: "length" = a JSON cut off
        tokens: dict[str, TokenTally] = defaultdict(TokenTally)  # by system and view
        vllm_direct = direct_sender(engine_url, task, served, sized, direct_finish, tokens["vllm-direct"])
        vllm_direct_raw = raw_direct_sender(engine_url, task, served, big, tokens["vllm-direct (12 MP)"])

        # Calibrate the output length the transformers systems must match.
        usage = []
        with httpx.Client(timeout=300) as c:
            for img in sized[:6]:
                payload = build_payload(task, served, build_messages(task, [img], "en"), 1, task.spec.sampling.max_tokens)
                answer = c.post(f"{engine_url}/v1/chat/completions", json=payload)
                if answer.status_code != 200:  # e.g. a config vLLM loads as a pooling model
                    raise SystemExit(f"vLLM at {engine_url} cannot answer the task: {answer.status_code} "
                                     f"{answer.text[:500]}")
                usage.append(answer.json()["usage"]["completion_tokens"])
        out_tokens = round(statistics.mean(usage))
        console.print(f"vLLM answers product_scan in {out_tokens} tokens on average: the seed systems generate that many")

        gw_port = free_port()
        gateway_log = Path(tempfile.mkdtemp(prefix="bench-compare-")) / "gateway.log"
        console.print(f"gateway log (JSON lines, warnings and errors): {gateway_log}")
        gateway: list[subprocess.Popen] = []
        gateway_work: Counter = Counter()  # summed over the gateway's restarts

        def start_gateway(admission: dict[str, str]) -> None:
            """(Re)start the gateway with these admission settings, its counters kept."""
            if gateway:
                gateway_work.update(gateway_counters(gw_port))
                stop(gateway[0])
                gateway.clear()
            gateway.append(start([sys.executable, "-m", "scanner_gateway", "serve", "--upstream", engine_url,
                                  "--port", str(gw_port)],
                                 {"SCANNER_MODEL": served, "SCANNER_DRAIN_S": "0", "SCANNER_ACCESS_LOG": "false",
                                  "SCANNER_PROMPTS_DIR": str(prompts_dir), **admission}, log=gateway_log))
            procs.append(gateway[0])
            wait_http(f"http://127.0.0.1:{gw_port}/ready")

        level_list = [int(c) for c in levels.split(",") if c]
        start_gateway({})  # admission at its defaults, as users run it
        seed_ports: dict[str, int] = {}
        seed_procs: dict[str, subprocess.Popen] = {}

        def start_seed(name: str) -> None:
            seed_ports.setdefault(name, free_port())
            seed_procs[name] = start([sys.executable, "bench/seed_systems.py", name, "--model", model_dir,
                                      "--port", str(seed_ports[name]), "--max-new-tokens", str(out_tokens),
                                      *(["--workers", str(seed_after_workers)] if name == "after" else [])])
            procs.append(seed_procs[name])
            wait_http(f"http://127.0.0.1:{seed_ports[name]}/health", timeout=300)

        def restart_seed(name: str) -> None:
            """A seed keeps working through its overload backlog after the clients left: restart it."""
            stop(seed_procs[name], signal.SIGKILL)
            start_seed(name)

        for name in ("before", "after"):
            if f"seed-{name}" in systems:
                start_seed(name)

        sized_bytes = [img.jpeg for img in sized]
        senders: dict[str, Send] = {
            "seed-before": multipart(f"http://127.0.0.1:{seed_ports.get('before')}/scan", sized_bytes, {},
                                     tokens["seed-before"]),
            "seed-after": multipart(f"http://127.0.0.1:{seed_ports.get('after')}/scan", sized_bytes, {},
                                    tokens["seed-after"]),
            "gateway": multipart(f"http://127.0.0.1:{gw_port}/v1/scan", sized_bytes, SCAN_FORM, tokens["gateway"]),
            "vllm-direct": vllm_direct,
        }
        chosen = [s for s in SYSTEMS if s in systems.split(",")]
        gpu = GpuMeter()
        designed: dict[str, SystemResult] = {}
        designed_senders = {
            "gateway": multipart(f"http://127.0.0.1:{gw_port}/v1/scan", big, SCAN_FORM, tokens["gateway (12 MP)"]),
            "seed-before": multipart(f"http://127.0.0.1:{seed_ports.get('before')}/scan", big, {},
                                     tokens["seed-before (12 MP)"]),
        }
        if engine is not None or engine_has_budget:  # else vLLM would see the raw photo at full size
            designed_senders["vllm-direct"] = vllm_direct_raw
        base = results_base(out, "compare")
        base.parent.mkdir(parents=True, exist_ok=True)
        level_log = base.with_suffix(".levels.jsonl")
        level_log.write_text("")
        console.print(f"each level as it ends: {level_log}")
        sweep_args = {"levels": level_list, "seconds": seconds, "slo_s": slo_s, "gpu": gpu, "log": level_log}
        quiet = busy_fraction(3.0) + 0.2  # what "idle" is here, with every server up

        def report_now(work: Counter, overload_done: bool) -> dict:
            return {"machine": machine(), "gateway_work": dict(work), "engine_cache_hits": engine_cache_hits(engine_url),
                    "gateway_overload_settings": {view: runs["gateway"].overload_settings
                                                  for view, runs in (("same budget", results), ("12 MP", designed))
                                                  if "gateway" in runs and runs["gateway"].overload_settings},
                    "vllm_direct_finish_reasons": dict(direct_finish), "task": "product_scan",
                    "max_items": max_items or None, "output_tokens": out_tokens, "slo_p95_s": slo_s,
                    "seed_after_workers": seed_after_workers, "warm_up": warm_up_requests,
                    "overload_run": overload_done, "overload_pending": overload and not overload_done,
                    "same_budget_run": same_budget,
                    "seconds_per_level": seconds, "photos": photos, "resolutions": RESOLUTIONS,
                    "same_budget": {k: asdict(v) for k, v in results.items()},
                    "as_designed_12mp": {k: asdict(v) for k, v in designed.items()}}

        console.print(f"idle machine: {100 * (quiet - 0.2):.0f}% CPU busy")
        console.print(f"warming up every system alike: {warm_up_requests} requests, {WARM_UP_CONCURRENCY} at a time")
        for name in chosen:
            warm_up(senders[name], warm_up_requests)
        for tally in tokens.values():
            tally.reset()  # only measured answers count

        def fill_tokens() -> None:
            for view, runs in (("", results), (" (12 MP)", designed)):
                for name, result in runs.items():
                    if f"{name}{view}" in tokens:
                        tokens[f"{name}{view}"].fill(result)
        with Progress(console=console) as progress:
            # Every sweep first, on a quiet machine; the overloads (which leave work behind) last.
            results = (sweep({n: senders[n] for n in chosen}, quiet=quiet, progress=progress, **sweep_args)
                       if same_budget else {})
            if as_designed:
                designed = {name.removesuffix(" (12 MP)"): result for name, result in sweep(
                    {f"{n} (12 MP)": designed_senders[n] for n in designed_senders if n in chosen},
                    quiet=quiet, progress=progress, **sweep_args).items()}
            if overload:  # the sweeps' report now: a run cut short in its 10x runs (a lent GPU's time) keeps it
                interim = Counter(gateway_work)
                interim.update(gateway_counters(gw_port))
                fill_tokens()
                write_report(report_now(interim, False), results, designed, base)
            overloads = ((results, senders), (designed, designed_senders)) if overload else ()
            bar = progress.add_task("10x overload runs", total=len(results) + len(designed), visible=overload)
            for runs, send_of in overloads:
                for name, result in runs.items():
                    if name == "gateway":
                        result.overload_settings = admission_for(result, slo_s)
                        start_gateway(result.overload_settings)
                    settle(quiet, gpu)
                    overload_system(result, send_of[name], overload_seconds, slo_s)
                    if name.startswith("seed-"):
                        restart_seed(name.removeprefix("seed-"))
                        progress.advance(bar)
                        continue
                    # The engine works on through the backlog after the clients gave up (and
                    # has been OOM-killed doing so): wait for it here, so that its fate is put
                    # down to the run that left the backlog, not to the next or to none.
                    settle(quiet, gpu)
                    if engine is not None and engine.exit_code is not None:
                        # Unguarded, vLLM takes in every photo it is sent: a 10x burst of 12 MP
                        # ones has had its API process OOM-killed here (18 GB). Say so, and go on.
                        code = engine.exit_code
                        result.overload_note = (f"vLLM exited during this run or the backlog it left (code {code}"
                                                + (": SIGKILL, as the kernel's OOM killer sends" if code == -9 else "")
                                                + "); restarted for what followed")
                        console.print(f"[red]{name}: {result.overload_note}[/red]")
                        engine.stop()
                        engine.start()
                        engine.wait_healthy(900)
                    progress.advance(bar)
        gateway_work.update(gateway_counters(gw_port))
        fill_tokens()
        write_report(report_now(gateway_work, overload), results, designed, base)
        level_log.unlink()  # all of it is in the report now
    finally:
        for proc in procs:
            stop(proc)
        if engine is not None:
            engine.stop()


RESOLUTIONS = [(1024, 768), (1600, 1200), (2000, 1500)]
SCAN_FORM = {"task": "product_scan", "locale": "en"}


def photo_sets(task: Task, photos: int) -> tuple[list[NormalizedImage], list[bytes]]:
    """`photos` distinct shelf photos at three resolutions, already sized to the task's
    budget, and as many distinct 12 MP ones (vLLM's encoder cache must find no repeat)."""
    raw = [shelf_jpeg(*RESOLUTIONS[i % 3], seed=5000 + i) for i in range(photos)]
    sized = [normalize_image(p, task.budget, max_bytes=2**26, max_pixels=10**8) for p in raw]
    return sized, [shelf_jpeg(4000, 3000, seed=9000 + i) for i in range(photos)]


def bench_engine_options(model_dir: str, registry: TaskRegistry, task: Task,
                         extra_args: Sequence[str] = ()) -> EngineOptions:
    """vLLM on `model_dir` as the bench runs it: the gateway's own flags, the task's budget
    applied server-side (for raw photos sent straight to it), its prefix and processor
    caches off, then `extra_args` (a GPU run's `--load-format dummy`, say)."""
    return EngineOptions(model=model_dir, served_model_name=DEV_SERVED_NAME, port=free_port(),
                         max_images=registry.most_images(),
                         max_image_pixels=max(t.spec.pixel_budget.max_pixels for t in registry),
                         max_model_len=DEV_MAX_MODEL_LEN,
                         extra_args=["--mm-processor-kwargs", json.dumps(server_side_budget(task)), *CACHES_OFF,
                                     *extra_args])


def start_engine(model_dir: str, registry: TaskRegistry, task: Task, extra_args: Sequence[str] = ()) -> ManagedEngine:
    engine = ManagedEngine(bench_engine_options(model_dir, registry, task, extra_args),
                           Path(tempfile.mkdtemp()) / "vllm.log")
    console.print(f"starting vLLM ... (log: {engine.log_path})")
    engine.start()
    engine.wait_healthy(900)
    return engine


def multipart(url: str, pictures: list[bytes], extra: dict, tally: TokenTally | None = None) -> Send:
    """POST each photo in turn as a multipart upload (the gateway's and the seeds' API)."""
    async def send(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(url, files={"image": ("shelf.jpg", pictures[i % len(pictures)], "image/jpeg")},
                              data=extra)
        if tally is not None and r.status_code == 200:
            tally.add(r.json().get("usage"))
        return r.status_code
    return send


def direct_sender(engine_url: str, task: Task, served: str, sized: list[NormalizedImage], finish: Counter,
                  tally: TokenTally | None = None) -> Send:
    """The gateway's own prompt and sized photo straight to vLLM; its finish reasons are
    counted ("length": a JSON cut off, which vllm-direct still counts as an answer)."""
    async def send(client: httpx.AsyncClient, i: int) -> int:
        payload = build_payload(task, served, build_messages(task, [sized[i % len(sized)]], "en"), 1,
                                task.spec.sampling.max_tokens)
        r = await client.post(f"{engine_url}/v1/chat/completions", json=payload)
        if r.status_code == 200:
            answer = r.json()
            finish[answer["choices"][0]["finish_reason"]] += 1
            if tally is not None:
                tally.add(answer.get("usage"))
        return r.status_code
    return send


def raw_direct_sender(engine_url: str, task: Task, served: str, photos: list[bytes],
                      tally: TokenTally | None = None) -> Send:
    """Raw photos straight to vLLM. The bodies are built once, so the load generator
    spends no CPU per request on base64 and JSON."""
    bodies = [json.dumps(build_payload(task, served, build_messages(task, [raw_image(photo)], "en"), 1,
                                       task.spec.sampling.max_tokens)).encode() for photo in photos]

    async def send(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(f"{engine_url}/v1/chat/completions", content=bodies[i % len(bodies)],
                              headers={"content-type": "application/json"})
        if tally is not None and r.status_code == 200:
            tally.add(r.json().get("usage"))
        return r.status_code
    return send


def capped_prompts(max_items: int) -> Path:
    """A copy of prompts/ whose product_scan arrays hold at most `max_items` (never fewer
    than their minItems: a box stays four numbers)."""
    copy = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    for path in default_prompts_dir().glob("*.yaml"):
        shutil.copy(path, copy / path.name)
    spec = yaml.safe_load((copy / "product_scan.yaml").read_text())

    def cap(node: object) -> None:
        if isinstance(node, dict):
            if "maxItems" in node:
                node["maxItems"] = max(node.get("minItems", 0), min(node["maxItems"], max_items))
            for child in node.values():
                cap(child)
        elif isinstance(node, list):
            for child in node:
                cap(child)

    cap(spec["result_schema"])
    (copy / "product_scan.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return copy


def server_side_budget(task: Task) -> dict:
    """vLLM's `--mm-processor-kwargs` for the task's pixel budget: Qwen-VL processors read
    `size` as pixel counts (longest_edge = max pixels, shortest_edge = min pixels)."""
    budget = task.budget
    return {"size": {"longest_edge": budget.max_pixels, "shortest_edge": budget.min_pixels}}


def raw_image(photo: bytes) -> SimpleNamespace:
    """A photo as is, where build_messages takes a normalised one (only its data URL is used)."""
    return SimpleNamespace(data_url="data:image/jpeg;base64," + base64.b64encode(photo).decode())


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
    typer.run(main)

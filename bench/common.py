"""What the benches share: ports, processes, the machine, meters, result files."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
console = Console()


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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


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


def exit_on_sigterm() -> None:
    """A SIGTERM (a CI runner, `timeout`, a user's kill) ends the run through its `finally`
    blocks, so the servers it started are stopped; Python's default would skip them."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

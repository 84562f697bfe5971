"""bench/compare.py at toy scale against the session's real engine, so it cannot rot.
No timing is asserted: only that every system ran and the report files are complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_compare_runs_all_four_systems_at_toy_scale(engine, dev_model_dir, tmp_path):
    name = "smoke-test"
    results = ROOT / "bench" / "results"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.compare", "--engine-url", engine.base_url, "--model", str(dev_model_dir),
             "--seconds", "2", "--levels", "2", "--overload-seconds", "2", "--photos", "4", "--slo-s", "60",
             "--max-items", "2", "--warm-up", "4", "--out", name],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((results / f"{name}.json").read_text())
        assert set(report["same_budget"]) == {"seed-before", "seed-after", "gateway", "vllm-direct"}
        assert set(report["as_designed_12mp"]) == {"gateway", "seed-before"}
        for system in report["same_budget"].values():
            assert system["unloaded"]["requests"] >= 1 and system["sweep"]
            assert 0.0 <= system["overload_error_rate"] <= 1.0
        assert report["output_tokens"] > 0 and report["machine"]["cores"] >= 1
        assert report["max_items"] == 2  # the task's arrays capped for every system alike
        assert report["seed_after_workers"] == 4  # as the seed deployed it (gunicorn -w 4)
        # Same pixel budget, shown: every system's answers took the same prompt tokens, and
        # the transformers seeds generated as many tokens as vLLM's answers had.
        budget = report["same_budget"]
        assert len({system["prompt_tokens"] for system in budget.values()}) == 1
        for seed in ("seed-before", "seed-after"):
            assert budget[seed]["completion_tokens"] == report["output_tokens"]
        md = (results / f"{name}.md").read_text()
        assert "capped at 2 item(s)" in md
        for row in ("average response time", "max QPS", "GPU utilisation", "error rate at 10x capacity",
                    "Gateway event loop:", "prompt / completion tokens per answer", "same warm-up"):
            assert row in md
        assert report["gateway_work"]["loop_late_s"] >= 0 and "loop_late_over_1s" in report["gateway_work"]
        assert (results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (results / f"{name}.levels.jsonl").exists()  # a finished run's levels are in the report
    finally:
        for suffix in (".json", ".md", ".png", ".levels.jsonl"):
            (results / f"{name}{suffix}").unlink(missing_ok=True)


def test_ab_runs_paired_rounds_and_splits_the_cpu_by_process(engine, dev_model_dir):
    name = "smoke-test-ab"
    results = ROOT / "bench" / "results"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.ab", "--engine-url", engine.base_url, "--engine-pid", str(engine.pid),
             "--model", str(dev_model_dir), "--views", "same-budget", "--levels", "2", "--rounds", "2",
             "--seconds", "2", "--photos", "4", "--max-items", "2", "--out", name],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((results / f"{name}.json").read_text())
        # ABBA: each system ran once per round, first in alternate rounds.
        runs = report["runs"]
        assert [(r["round"], r["system"]) for r in runs] == [
            (0, "gateway"), (0, "vllm-direct"), (1, "vllm-direct"), (1, "gateway")]
        assert all(r["answers"] >= 1 for r in runs)
        (row,) = report["summary"]
        assert row["view"] == "same-budget" and row["concurrency"] == 2 and len(row["paired_ratios"]) == 2
        assert row["ratio_of_means"] > 0
        cpu = row["gateway"]["cpu_ms_per_answer"]
        assert set(cpu) == {"gateway", "vLLM API", "vLLM engine core", "load generator"}
        # The engine did the model's work; the gateway relayed it (vllm-direct bypassed it).
        assert cpu["vLLM engine core"] > cpu["gateway"] > row["vllm-direct"]["cpu_ms_per_answer"]["gateway"]
        assert "| same-budget | 2 |" in (results / f"{name}.md").read_text()
    finally:
        for suffix in (".json", ".md"):
            (results / f"{name}{suffix}").unlink(missing_ok=True)


def test_ab_refuses_raw_photos_for_an_engine_without_the_budget(engine):
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--engine-url", engine.base_url, "--views", "12mp"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "--engine-has-budget" in done.stdout + done.stderr

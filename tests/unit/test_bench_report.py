"""bench/compare.py's report table, with and without the 10x runs (no engine needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare  # noqa: E402


def _result(name: str, overload_rate: float = 0.0) -> compare.SystemResult:
    result = compare.SystemResult(name)
    for concurrency, qps in ((1, 1.0), (4, 3.0)):
        result.add(compare.Level(concurrency, qps, 100, 90, 120, 130, 0, 10, 0.5), slo_s=10)
    result.overload_rate = overload_rate
    result.overload_outcomes = {"200": 8, "429": 2} if overload_rate else {}
    return result


def test_without_overload_runs_the_table_says_not_run_and_drops_the_10x_rows():
    lines = compare.table({"gateway": _result("gateway"), "vllm-direct": _result("vllm-direct")})
    assert "| error rate at 10x capacity | not run | not run |" in lines
    assert not any("429 / 5xx" in line or "at 10x (per s" in line for line in lines)
    assert "| max QPS (p95 within SLO) | 3.00 | 3.00 |" in lines


def test_with_overload_runs_every_10x_row_is_there():
    lines = compare.table({"gateway": _result("gateway", overload_rate=30.0)})
    assert any(line.startswith("| of which 429 / 5xx / timeout / refused | 2 / 0 / 0 / 0 |") for line in lines)
    assert not any("not run" in line for line in lines)

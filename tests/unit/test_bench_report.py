"""bench/compare.py's report table, with and without the 10x runs (no engine needed)."""

from __future__ import annotations

import pytest

from bench import common, compare, scan_load


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


def _report(overload_run: bool, overload_pending: bool) -> dict:
    return {"machine": {"cpu": "x", "cores": 2, "memory_gib": 4, "gpus": [], "vllm_cpu_reserved_cpu": "default"},
            "gateway_work": {"retried": 0, "scans": 10, "loop_late_s": 0, "loop_late_over_1s": 0},
            "engine_cache_hits": {}, "gateway_overload_settings": {}, "vllm_direct_finish_reasons": {},
            "task": "product_scan", "max_items": None, "output_tokens": 10, "slo_p95_s": 10,
            "overload_run": overload_run, "overload_pending": overload_pending, "same_budget_run": False,
            "seconds_per_level": 6, "photos": 4, "resolutions": [], "same_budget": {}, "as_designed_12mp": {},
            "warm_up": 8, "seed_after_workers": 4}


def test_a_12_mp_only_run_reports_the_same_budget_view_as_not_run(tmp_path):
    designed = {"gateway": _result("gateway"), "seed-before": _result("seed-before")}
    compare.write_report(_report(False, overload_pending=True), {}, designed, tmp_path / "run")
    md = (tmp_path / "run.md").read_text()
    assert "Not run (--no-same-budget)." in md and "## As designed, 12 MP" in md
    assert "The 10x runs had not finished when this was written" in md  # the sweeps' report, written first
    assert "max QPS gateway / seed-before = 1.00 (target 10x)" in md
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    compare.write_report(_report(False, overload_pending=False), {}, designed, tmp_path / "run")
    assert "No 10x runs (--no-overload)." in (tmp_path / "run.md").read_text()


def test_a_steady_window_with_fewer_answers_than_clients_is_no_rate():
    """A slow engine on a short level answers each client once and then nothing inside
    the window: that is no measured rate (a 0 answers/s would drop the round's pair)."""
    import asyncio

    calls = 0

    async def first_fast_then_past_the_level(client, i):
        nonlocal calls
        calls += 1
        if i >= 2:  # every client's second request outlives the level
            await asyncio.sleep(1.0)
        return 200

    latencies, errors, steady = asyncio.run(scan_load.closed_loop(first_fast_then_past_the_level, 2, 0.5, 5))
    assert steady is None
    assert errors == 0 and len(latencies) == calls == 4


def test_a_run_never_writes_over_results_already_there():
    import typer

    committed = sorted((common.ROOT / "bench" / "results").glob("*.md"))[0].stem
    with pytest.raises(typer.BadParameter):
        common.results_base(committed, "compare")
    fresh = common.results_base(None, "compare")  # by default a name of its own
    assert fresh.name.startswith("compare-") and common.git_commit().split("-")[0] in fresh.name
    assert not fresh.with_suffix(".md").exists()

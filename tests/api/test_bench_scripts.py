"""Bench scripts that need no real engine, run at toy scale so they cannot rot (no timing asserted)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.test_scan_api import PHOTO
from tests.helpers import gateway_process

ROOT = Path(__file__).resolve().parents[2]


def test_upload_burst_runs_against_its_fake_engine():
    done = subprocess.run(
        [sys.executable, "-m", "bench.upload_burst", "--rate", "4", "--seconds", "1", "--size", "1024x768",
         "--photos-n", "2", "--fake-ms", "50", "--max-in-flight", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "status mix" in done.stdout and "200: 4" in done.stdout  # every scan answered: the fake answers scans
    assert "gateway CPU" in done.stdout


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("h2load") is None,
                    reason="wrk or h2load is not installed (Debian packages wrk, nghttp2-client)")
def test_passthrough_measures_with_both_load_generators():
    done = subprocess.run(
        [sys.executable, "-m", "bench.passthrough", "--seconds", "1", "--concurrency", "4", "--body-kb", "10",
         "--ttfb-requests", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = re.sub(r"\s+", " ", done.stdout)
    for generator in ("wrk", "h2load"):
        assert f"target ({generator}) gateway CPU <= 0.3 ms/request" in out
        ratio = float(re.search(rf"{generator}: gateway/direct req/s = ([\d.]+)", out).group(1))
        assert ratio > 0  # both systems answered under this generator
    assert "access log on" in out  # measured as the gateway ships


def test_overload_fake_engine_run_admits_by_saturation_with_no_cap():
    done = subprocess.run(
        [sys.executable, "-m", "bench.overload", "--engine", "fake", "--seconds", "2", "--fake-ms", "200",
         "--fake-seats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = re.sub(r"\s+", " ", done.stdout)
    assert "no cap (saturation admission)" in out
    assert re.search(r"5xx │ 0 │", out)  # overload is 200s and 429s, never a 5xx
    assert "429:" in out  # 10x the capacity of a 2-seat engine: some were refused


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
def test_wrk_scan_script_posts_multipart_scans(fake_engine, tmp_path):
    photo = tmp_path / "shelf.jpg"
    photo.write_bytes(PHOTO)
    with gateway_process(fake_engine.url, tmp_path / "gateway.log", SCANNER_MODEL="m") as gateway:
        done = subprocess.run(
            ["wrk", "-t1", "-c2", "-d1s", "--timeout", "10s", "-s", "bench/scan.lua",
             f"{gateway.url}/v1/scan", "--", str(photo), "storefront"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    mix = re.search(r"status mix: 200 x(\d+)\n", done.stdout)  # every answer a 200: the multipart body is right
    assert mix and int(mix.group(1)) > 0, done.stdout
    scans = [r for r in fake_engine.received if r.path == "/v1/chat/completions"]
    assert len(scans) >= int(mix.group(1)) and b"image_url" in scans[0].body


def test_batch_bench_compares_a_batch_with_the_bulk_cli():
    done = subprocess.run(
        [sys.executable, "-m", "bench.batch", "--items", "12", "--interactive-seconds", "5", "--fake-ms", "20",
         "--no-save"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = re.sub(r"\s+", " ", done.stdout)
    assert re.search(r"batch / bulk CLI \| [\d.]+x \| >= 0.95x", out)
    assert re.search(r"with / without \| [\d.]+x \| <= 1.5x", out)
    assert "interactive scans not answered 200 (0: no answer in 60 s) | none" in out

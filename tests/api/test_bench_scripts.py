"""Bench scripts that need no real engine, run at toy scale so they cannot rot (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_upload_burst_runs_against_its_fake_engine():
    done = subprocess.run(
        [sys.executable, "bench/upload_burst.py", "--rate", "4", "--seconds", "1", "--size", "1024x768",
         "--photos-n", "2", "--fake-ms", "50", "--max-in-flight", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "status mix" in done.stdout and "200: 4" in done.stdout  # every scan answered: the fake answers scans
    assert "gateway CPU" in done.stdout

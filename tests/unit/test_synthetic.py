"""Synthetic shelf photos: the same seed gives the same bytes in every process."""

from __future__ import annotations

import subprocess
import sys

from scanner_gateway.synthetic import shelf_jpeg

_IN_A_FRESH_PROCESS = (
    "import sys; from scanner_gateway.synthetic import shelf_jpeg; "
    "sys.stdout.buffer.write(shelf_jpeg(640, 480, seed=11))"
)


def test_a_seed_gives_the_same_photo_in_another_process():
    # Another process: its C-level random state differs from this one's, which is what
    # made the noise differ before (Image.effect_noise draws from rand()).
    there = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS], capture_output=True, check=True).stdout
    shelf_jpeg(320, 240, seed=3)  # draws in between must not matter either
    assert shelf_jpeg(640, 480, seed=11) == there


def test_seeds_give_distinct_photos():
    assert shelf_jpeg(640, 480, seed=1) != shelf_jpeg(640, 480, seed=2)

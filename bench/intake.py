"""Image-normalisation figures (issue: a 12 MP phone JPEG in <= 30 ms CPU, sent as <= 300 KB).

    .venv/bin/python -m bench.intake [--repeat 20]

Measures `normalize_image` (sniff, header check, draft decode, EXIF, resize to the task's
pixel budget in 32 px tiles, JPEG encode, base64) on synthetic photos of several sizes.
The 1024x768 photo already has product_scan's size, so it is only checked and sent as is.
CPU time is process CPU (time.process_time) per image, single thread.
"""

from __future__ import annotations

import platform
import statistics
import time

import typer
from rich.console import Console
from rich.table import Table

from scanner_gateway.scan.images import PixelBudget, normalize_image
from scanner_gateway.synthetic import shelf_jpeg

SIZES = [(1024, 768), (1920, 1080), (3024, 4032), (4000, 3000), (6000, 4000), (8000, 6000)]
BUDGET = PixelBudget(max_pixels=786432)  # product_scan / shelf_audit


def main(repeat: int = 20, max_pixels: int = BUDGET.max_pixels) -> None:
    budget = PixelBudget(max_pixels=max_pixels)
    table = Table(title=f"normalize_image, budget {max_pixels} px ({platform.processor() or platform.machine()})")
    for col in ("photo", "MP", "in KB", "sent", "out KB", "CPU ms p50", "CPU ms p95", "wall ms p50"):
        table.add_column(col, justify="right")
    for w, h in SIZES:
        photo = shelf_jpeg(w, h, seed=w + h, quality=92)
        cpu, wall = [], []
        out = None
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            out = normalize_image(photo, budget, max_bytes=64 << 20, max_pixels=64_000_000)
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - t0) * 1000)
        assert out is not None
        cpu.sort()
        table.add_row(
            f"{w}x{h}", f"{w * h / 1e6:.1f}", f"{len(photo) / 1024:.0f}",
            f"{out.scale.sent_width}x{out.scale.sent_height}", f"{len(out.jpeg) / 1024:.0f}",
            f"{statistics.median(cpu):.1f}", f"{cpu[int(0.95 * (len(cpu) - 1))]:.1f}",
            f"{statistics.median(wall):.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

"""Bulk scans for auditors: folders of photos -> one row per image in JSONL or CSV.

Rows are written as each scan finishes (an interrupted run loses nothing), and a rerun
skips every image already in the output, so it resumes where it stopped
(`retry_failed` scans the failed ones again and adds a newer row for each).
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner_gateway.client import AsyncScanClient, ScanError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
)
CSV_FIELDS = ("file", "task", "status", "scan_id", "result", "error_code", "error")


def find_images(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(images, missing): files as given, folders searched recursively for photos."""
    found: list[Path] = []
    missing: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, missing


class ResultsFile:
    """The output file: JSONL (`.jsonl`) or CSV (`.csv`), appended row by row."""

    def __init__(self, path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise ValueError(f"output must end in .jsonl or .csv, not {path.name!r}")
        self.path = path
        self.is_csv = suffix == ".csv"

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            if self.is_csv:
                return list(csv.DictReader(f))
            return [json.loads(line) for line in f if line.strip()]

    def done(self, retry_failed: bool) -> set[str]:
        """Files whose latest row means: do not scan again."""
        latest = {row["file"]: row["status"] for row in self.rows()}
        return {f for f, status in latest.items() if status == "ok" or not retry_failed}

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            if self.is_csv:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                if new:
                    writer.writeheader()
                flat = {**row, "result": json.dumps(row["result"], ensure_ascii=False) if row["result"] else ""}
                writer.writerow({k: flat.get(k, "") for k in CSV_FIELDS})
            else:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass
class BulkSummary:
    scanned: Counter
    skipped: int

    @property
    def failed(self) -> int:
        return self.scanned["error"]


async def scan_all(
    client: AsyncScanClient,
    images: list[Path],
    task: str,
    out: ResultsFile,
    *,
    concurrency: int,
    locale: str | None = None,
    retry_failed: bool = False,
    on_done: Callable[[Path, str], None] = lambda path, status: None,
) -> BulkSummary:
    done = out.done(retry_failed)
    todo = [p for p in images if str(p) not in done]
    gate = asyncio.Semaphore(concurrency)
    counts: Counter = Counter()

    async def one(path: Path) -> None:
        async with gate:
            row: dict[str, Any] = {"file": str(path), "task": task}
            try:
                scan = await client.scan(path, task, locale=locale)
                row |= {"status": "ok", "scan_id": scan.id,
                        "result": scan.model_dump(mode="json")["result"], "error_code": None, "error": None}
            except ScanError as exc:
                row |= {"status": "error", "scan_id": None, "result": None, "error_code": exc.code,
                        "error": exc.message}
            except OSError as exc:  # unreadable file
                row |= {"status": "error", "scan_id": None, "result": None, "error_code": "unreadable_file",
                        "error": str(exc)}
        out.append(row)
        counts[row["status"]] += 1
        on_done(path, row["status"])

    await asyncio.gather(*(one(p) for p in todo))
    return BulkSummary(counts, len(images) - len(todo))

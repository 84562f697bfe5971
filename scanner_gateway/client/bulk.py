"""Bulk scans for auditors: folders of photos -> one row per image in JSONL or CSV.

Rows are written as each scan finishes (an interrupted run loses nothing), and a rerun
skips every image already in the output for the same task, so it resumes where it
stopped (`retry_failed` scans the failed ones again and adds a newer row for each). A
row torn by a run that was killed mid-write is dropped and its image scanned again.
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

from scanner_gateway.client.scan_client import AsyncScanClient, ScanError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
)
CSV_FIELDS = ("file", "task", "status", "scan_id", "result", "error_code", "error")
# How each format ends a row: csv's writer ends rows with CRLF (a bare LF can only be
# inside a quoted field, e.g. a multi-line error message); JSON lines escape newlines.
_ROW_END = {True: b"\r\n", False: b"\n"}


def find_images(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(images, missing): files as given, folders searched recursively for photos.

    Hidden files and folders inside a folder are left out: a Mac writes a `._IMG_0001.jpg`
    resource-fork stub beside every photo it copies to a USB stick, and camera apps keep
    `.thumbnails/`; scanning those would only add failures (or thumbnails) to the audit."""
    found: list[Path] = []
    missing: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
            )
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
        # A BOM at the start of a CSV is how Excel knows it is UTF-8 (Chinese product names).
        self.encoding = "utf-8-sig" if self.is_csv else "utf-8"

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding=self.encoding) as f:
            if self.is_csv:
                return list(csv.DictReader(f))
            return [json.loads(line) for line in f if line.strip()]

    def drop_torn_row(self) -> int:
        """Cut a last row that a killed run left half-written (else it would swallow the
        next row, or stop the JSON reader); returns the bytes cut."""
        if not self.path.exists():
            return 0
        data, end = self.path.read_bytes(), _ROW_END[self.is_csv]
        if not data or data.endswith(end):
            return 0
        last_end = data.rfind(end)
        keep = last_end + len(end) if last_end != -1 else 0
        with self.path.open("r+b") as f:
            f.truncate(keep)
        return len(data) - keep

    def latest(self) -> dict[tuple[str, str], str]:
        """(file, task) -> status of its newest row."""
        return {(row["file"], row["task"]): row["status"] for row in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding=self.encoding) as f:
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
    skipped_failed: int = 0  # of the skipped: their last row failed (retry_failed scans them)
    torn_bytes: int = 0  # a half-written last row from an interrupted run, cut before resuming

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
    torn = out.drop_torn_row()
    latest = out.latest()
    status_before = [latest.get((str(p), task)) for p in images]
    skip = [s is not None and (s == "ok" or not retry_failed) for s in status_before]
    todo = iter([p for p, skipped in zip(images, skip, strict=True) if not skipped])
    counts: Counter = Counter()

    async def one(path: Path) -> None:
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

    async def worker() -> None:
        for path in todo:  # one shared iterator: each image goes to one worker
            await one(path)

    # `concurrency` workers, not one task per image: a folder of 100k photos stays small in memory.
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    skipped_failed = sum(1 for s, skipped in zip(status_before, skip, strict=True) if skipped and s != "ok")
    return BulkSummary(counts, sum(skip), skipped_failed, torn)

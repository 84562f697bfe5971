"""Batches, their items and files, in the database: every state change is one statement
or one transaction, so any number of worker processes (one host on SQLite, many pods on
PostgreSQL) can work the same batches.

Items are claimed under a lease: a worker that dies (SIGKILL, a lost pod) leaves its
items' leases to run out, and then any worker claims them again. An answer is stored
only by the worker still holding the item's lease, and a stored item is never claimed
again: each item's answer is stored once, and its request is not sent again after that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scanner_gateway.batches.database import Connection, Database, Row, fetch_one
from scanner_gateway.batches.input_lines import InputLine
from scanner_gateway.batches.objects import BatchObject, FileObject, RequestCounts

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batch_files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        created_us BIGINT NOT NULL,
        deleted_at BIGINT)""",
    """CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        metadata TEXT,
        created_at BIGINT NOT NULL,
        created_us BIGINT NOT NULL,
        in_progress_at BIGINT,
        expires_at BIGINT NOT NULL,
        finalizing_at BIGINT,
        completed_at BIGINT,
        failed_at BIGINT,
        expired_at BIGINT,
        cancelling_at BIGINT,
        cancelled_at BIGINT,
        output_file_id TEXT,
        error_file_id TEXT,
        final_owner TEXT,
        final_until DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, created_us)",
    "CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status)",
    """CREATE TABLE IF NOT EXISTS batch_items (
        batch_id TEXT NOT NULL,
        line_no INTEGER NOT NULL,
        custom_id TEXT,
        state TEXT NOT NULL,
        byte_offset BIGINT NOT NULL,
        byte_length BIGINT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        status_code INTEGER,
        request_id TEXT,
        response_body TEXT,
        error_code TEXT,
        error_message TEXT,
        PRIMARY KEY (batch_id, line_no))""",
    "CREATE INDEX IF NOT EXISTS batch_items_by_state ON batch_items (state, batch_id)",
)
ACTIVE_BATCH = "('in_progress', 'finalizing', 'cancelling')"
FINAL_STATUSES = ("completed", "cancelled", "expired")
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class ClaimedItem:
    batch_id: str
    line_no: int
    custom_id: str
    byte_offset: int
    byte_length: int
    attempts: int
    owner: str
    endpoint: str
    input_file_id: str


@dataclass(frozen=True)
class ItemOutcome:
    """What a finished item stores: an answer (any status), or an error without one."""

    status_code: int | None = None
    request_id: str | None = None
    response_body: str | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def state(self) -> str:
        return "done" if self.status_code is not None and 200 <= self.status_code < 300 else "failed"


def _created_us() -> int:
    """Creation order for listing newest first (several per second happen; ids are random)."""
    return time.time_ns() // 1000


def _file(row: Row) -> FileObject:
    return FileObject(id=row["id"], bytes=row["bytes"], created_at=row["created_at"],
                      filename=row["filename"], purpose=row["purpose"])


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_schema(self) -> None:
        async with self.db.transaction() as conn:
            for statement in SCHEMA:
                await conn.execute(statement)

    # files

    async def add_file(self, file: FileObject, owner: str, conn: Connection | None = None) -> None:
        # ON CONFLICT: a finalizer that died after writing its row and is run again.
        await (conn or self.db).execute(
            "INSERT INTO batch_files (id, owner, purpose, filename, bytes, created_at, created_us) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            file.id, owner, file.purpose, file.filename, file.bytes, file.created_at, _created_us(),
        )

    async def get_file(self, file_id: str, owner: str) -> FileObject | None:
        row = await fetch_one(self.db, "SELECT * FROM batch_files WHERE id = $1 AND owner = $2 AND deleted_at IS NULL",
                              file_id, owner)
        return _file(row) if row else None

    async def list_files(self, owner: str, limit: int, after: str | None) -> list[FileObject]:
        rows = await self.db.fetch(
            "SELECT * FROM batch_files WHERE owner = $1 AND deleted_at IS NULL AND (CAST($2 AS TEXT) IS NULL OR "
            "created_us < (SELECT created_us FROM batch_files WHERE id = $2)) "
            "ORDER BY created_us DESC LIMIT $3",
            owner, after, limit,
        )
        return [_file(row) for row in rows]

    async def file_in_use(self, file_id: str) -> bool:
        return await fetch_one(
            self.db, f"SELECT 1 AS x FROM batches WHERE input_file_id = $1 AND status IN {ACTIVE_BATCH} LIMIT 1",
            file_id) is not None

    async def delete_file(self, file_id: str, owner: str, now: int) -> bool:
        return await self.db.execute(
            "UPDATE batch_files SET deleted_at = $3 WHERE id = $1 AND owner = $2 AND deleted_at IS NULL",
            file_id, owner, now,
        ) > 0

    # batches

    async def add_batch(self, batch: BatchObject, owner: str, lines: Sequence[InputLine]) -> None:
        """The batch and all its items at once: a batch is never seen half made."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, metadata, "
                "created_at, created_us, in_progress_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                batch.id, owner, batch.endpoint, batch.input_file_id, batch.completion_window, batch.status,
                json.dumps(batch.metadata) if batch.metadata is not None else None,
                batch.created_at, _created_us(), batch.in_progress_at, batch.expires_at,
            )
            for start in range(0, len(lines), INSERT_CHUNK):
                await conn.executemany(
                    "INSERT INTO batch_items (batch_id, line_no, custom_id, state, byte_offset, byte_length, "
                    "error_code, error_message) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    [(batch.id, ln.line_no, ln.custom_id, "failed" if ln.error_code else "pending",
                      ln.offset, ln.length, ln.error_code, ln.error_message)
                     for ln in lines[start:start + INSERT_CHUNK]],
                )

    async def get_batch(self, batch_id: str, owner: str | None) -> BatchObject | None:
        """One batch; `owner` None: whoever owns it (the workers)."""
        row = await fetch_one(
            self.db, "SELECT * FROM batches WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR owner = $2)", batch_id, owner
        )
        if row is None:
            return None
        return (await self._with_counts([row]))[0]

    async def list_batches(self, owner: str, limit: int, after: str | None) -> list[BatchObject]:
        rows = await self.db.fetch(
            "SELECT * FROM batches WHERE owner = $1 AND (CAST($2 AS TEXT) IS NULL OR "
            "created_us < (SELECT created_us FROM batches WHERE id = $2)) "
            "ORDER BY created_us DESC LIMIT $3",
            owner, after, limit,
        )
        return await self._with_counts(rows)

    async def _with_counts(self, rows: list[Row]) -> list[BatchObject]:
        counts: dict[str, RequestCounts] = {row["id"]: RequestCounts() for row in rows}
        if rows:
            marks = ", ".join(f"${i}" for i in range(1, len(rows) + 1))
            for count in await self.db.fetch(
                f"SELECT batch_id, state, COUNT(*) AS n FROM batch_items WHERE batch_id IN ({marks}) "
                "GROUP BY batch_id, state", *counts,
            ):
                tally = counts[count["batch_id"]]
                tally.total += count["n"]
                if count["state"] == "done":
                    tally.completed += count["n"]
                elif count["state"] == "failed":
                    tally.failed += count["n"]
        return [_batch(row, counts[row["id"]]) for row in rows]

    async def cancel(self, batch_id: str, owner: str, now: int) -> bool:
        """in_progress -> cancelling; False when the batch is past that."""
        return await self.db.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $3 "
            "WHERE id = $1 AND owner = $2 AND status IN ('validating', 'in_progress')",
            batch_id, owner, now,
        ) > 0

    # items: the workers' side

    async def claim(self, worker: str, limit: int, now: float, lease_s: float) -> list[ClaimedItem]:
        """Up to `limit` items of running batches, oldest batch first: waiting ones, and
        running ones whose worker's lease ran out."""
        rows = await self.db.fetch(
            "UPDATE batch_items SET state = 'running', lease_owner = $1, lease_until = $2, attempts = attempts + 1 "
            "WHERE (batch_id, line_no) IN ("
            "  SELECT i.batch_id, i.line_no FROM batch_items i JOIN batches b ON b.id = i.batch_id "
            "  WHERE b.status = 'in_progress' AND b.expires_at > CAST($3 AS DOUBLE PRECISION) "
            "    AND (i.state = 'pending' OR (i.state = 'running' AND i.lease_until < CAST($3 AS DOUBLE PRECISION))) "
            f"  ORDER BY b.created_us, i.line_no LIMIT $4{self.db.claim_lock}) "
            "RETURNING batch_id, line_no, custom_id, byte_offset, byte_length, attempts",
            worker, now + lease_s, now, limit,
        )
        if not rows:
            return []
        batches = {row["batch_id"] for row in rows}
        marks = ", ".join(f"${i}" for i in range(1, len(batches) + 1))
        about = {b["id"]: b for b in await self.db.fetch(
            f"SELECT id, owner, endpoint, input_file_id FROM batches WHERE id IN ({marks})", *batches)}
        return [
            ClaimedItem(row["batch_id"], row["line_no"], row["custom_id"], row["byte_offset"], row["byte_length"],
                        row["attempts"], about[row["batch_id"]]["owner"], about[row["batch_id"]]["endpoint"],
                        about[row["batch_id"]]["input_file_id"])
            for row in sorted(rows, key=lambda r: (r["batch_id"], r["line_no"]))
        ]

    async def renew(self, worker: str, until: float) -> int:
        return await self.db.execute(
            "UPDATE batch_items SET lease_until = $2 WHERE lease_owner = $1 AND state = 'running'", worker, until
        )

    async def finish(self, item: ClaimedItem, worker: str, outcome: ItemOutcome) -> bool:
        """Store an item's outcome, if this worker still holds it; False: it lost the lease
        (another worker has the item now, and its outcome will be the one stored)."""
        return await self.db.execute(
            "UPDATE batch_items SET state = $4, status_code = $5, request_id = $6, response_body = $7, "
            "error_code = $8, error_message = $9, lease_owner = NULL, lease_until = NULL "
            "WHERE batch_id = $1 AND line_no = $2 AND lease_owner = $3 AND state = 'running'",
            item.batch_id, item.line_no, worker, outcome.state, outcome.status_code, outcome.request_id,
            outcome.response_body, outcome.error_code, outcome.error_message,
        ) > 0

    async def release(self, item: ClaimedItem, worker: str, *, count_attempt: bool) -> None:
        """Give an item back to wait (the gateway was overloaded, the engine away)."""
        await self.db.execute(
            "UPDATE batch_items SET state = 'pending', lease_owner = NULL, lease_until = NULL, "
            "attempts = attempts - $4 WHERE batch_id = $1 AND line_no = $2 AND lease_owner = $3 AND state = 'running'",
            item.batch_id, item.line_no, worker, 0 if count_attempt else 1,
        )

    async def close_out(self, now: float) -> None:
        """Items that will not run: those of cancelled batches, and of batches past their
        window, still waiting or left by a dead worker, fail with the reason."""
        for status, window, code, message in (
            ("cancelling", "", "batch_cancelled", "the batch was cancelled before this request ran"),
            ("in_progress", " AND expires_at <= CAST($1 AS DOUBLE PRECISION)", "batch_expired",
             "the batch's completion window ended before this request ran"),
        ):
            await self.db.execute(
                "UPDATE batch_items SET state = 'failed', error_code = $2, error_message = $3, "
                "lease_owner = NULL, lease_until = NULL "
                "WHERE (state = 'pending' OR (state = 'running' AND lease_until < CAST($1 AS DOUBLE PRECISION))) "
                "AND batch_id IN "
                f"(SELECT id FROM batches WHERE status = '{status}'{window})",
                now, code, message,
            )

    async def finishable(self) -> list[str]:
        """Active batches whose every item is done or failed."""
        rows = await self.db.fetch(
            f"SELECT id FROM batches b WHERE status IN {ACTIVE_BATCH} AND NOT EXISTS "
            "(SELECT 1 FROM batch_items i WHERE i.batch_id = b.id AND i.state IN ('pending', 'running'))"
        )
        return [row["id"] for row in rows]

    async def claim_finalizing(self, batch_id: str, worker: str, now: float, lease_s: float) -> Row | None:
        """The right to write a finished batch's files, for one worker at a time."""
        return await fetch_one(
            self.db,
            "UPDATE batches SET final_owner = $2, final_until = $3, "
            "status = CASE WHEN status = 'in_progress' THEN 'finalizing' ELSE status END, "
            "finalizing_at = CASE WHEN status = 'in_progress' THEN $5 ELSE finalizing_at END "
            f"WHERE id = $1 AND status IN {ACTIVE_BATCH} AND (final_owner IS NULL OR final_until < $4) "
            "RETURNING id, owner, status, expires_at",
            batch_id, worker, now + lease_s, now, int(now),
        )

    async def item_page(self, batch_id: str, after_line: int, limit: int) -> list[Row]:
        return await self.db.fetch(
            "SELECT line_no, custom_id, state, status_code, request_id, response_body, error_code, error_message "
            "FROM batch_items WHERE batch_id = $1 AND line_no > $2 ORDER BY line_no LIMIT $3",
            batch_id, after_line, limit,
        )

    async def has_expired_items(self, batch_id: str) -> bool:
        return await fetch_one(
            self.db, "SELECT 1 AS x FROM batch_items WHERE batch_id = $1 AND error_code = 'batch_expired' LIMIT 1",
            batch_id,
        ) is not None

    async def finalize(self, batch_id: str, worker: str, status: str, now: int, owner: str,
                       output: FileObject | None, errors: FileObject | None) -> bool:
        """Record the output files and the final status, if this worker still finalizes."""
        assert status in FINAL_STATUSES
        async with self.db.transaction() as conn:
            done = await conn.execute(
                f"UPDATE batches SET status = $3, {status}_at = $4, output_file_id = $5, error_file_id = $6, "
                "final_owner = NULL, final_until = NULL WHERE id = $1 AND final_owner = $2",
                batch_id, worker, status, now, output.id if output else None, errors.id if errors else None,
            )
            if done:
                for file in (output, errors):
                    if file is not None:
                        await self.add_file(file, owner, conn)
            return done > 0

    async def item_counts(self) -> dict[str, int]:
        """Items by state across every batch (the metrics' gauge)."""
        return {row["state"]: row["n"] for row in await self.db.fetch(
            "SELECT state, COUNT(*) AS n FROM batch_items GROUP BY state")}


def _batch(row: Row, counts: RequestCounts) -> BatchObject:
    metadata: Any = json.loads(row["metadata"]) if row["metadata"] else None
    return BatchObject(
        id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
        completion_window=row["completion_window"], status=row["status"],
        output_file_id=row["output_file_id"], error_file_id=row["error_file_id"],
        created_at=row["created_at"], in_progress_at=row["in_progress_at"], expires_at=row["expires_at"],
        finalizing_at=row["finalizing_at"], completed_at=row["completed_at"], failed_at=row["failed_at"],
        expired_at=row["expired_at"], cancelling_at=row["cancelling_at"], cancelled_at=row["cancelled_at"],
        request_counts=counts, metadata=metadata,
    )

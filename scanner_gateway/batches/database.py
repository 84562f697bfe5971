"""One small SQL interface over the two stores batches live in.

SQLite (WAL) is the embedded default: one file under the data directory, shared by the
worker processes of one host. PostgreSQL (`SCANNER_DATABASE_URL=postgresql://...`) is for
several gateway pods. Statements are written once, with PostgreSQL's `$1` placeholders
(SQLite reads them as `?1`); the dialects differ only in `claim_lock` (row locks that
other claimers skip; SQLite has one writer at a time instead).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

SQLITE_BUSY_TIMEOUT_MS = 30_000  # other processes' writes are short; wait for them, do not fail
POSTGRES_POOL_SIZE = 8
_PLACEHOLDER = re.compile(r"\$(\d+)")

Row = dict[str, Any]


class Connection(Protocol):
    async def execute(self, sql: str, *args: Any) -> int: ...  # rows changed

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...


class Database(Connection, Protocol):
    claim_lock: str  # appended to the claim's inner SELECT

    def transaction(self) -> Any: ...  # async context manager yielding a Connection

    async def close(self) -> None: ...


async def fetch_one(conn: Connection, sql: str, *args: Any) -> Row | None:
    rows = await conn.fetch(sql, *args)
    return rows[0] if rows else None


class SqliteDatabase:
    """aiosqlite (sqlite3 on its own thread), one connection per process. Writes from
    several processes take turns (busy timeout); within the process a lock keeps a
    transaction's statements together."""

    claim_lock = ""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        import aiosqlite

        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)  # autocommit; BEGIN IMMEDIATE where needed
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at each checkpoint, never corrupt
        return cls(conn)

    async def _execute(self, sql: str, args: Sequence[Any]) -> int:
        cursor = await self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), args)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def _fetch(self, sql: str, args: Sequence[Any]) -> list[Row]:
        async with self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), args) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.transaction() as conn:
            return await conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.transaction() as conn:
            await conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return await self._fetch(sql, args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._lock:
            # IMMEDIATE: take the write lock now, so a read-then-write cannot meet another
            # process's write halfway (SQLITE_BUSY that no waiting resolves).
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTransaction(self)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def close(self) -> None:
        await self._conn.close()


class _SqliteTransaction:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._db._execute(sql, args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db._conn.executemany(_PLACEHOLDER.sub(r"?\1", sql), list(rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._db._fetch(sql, args)


class PostgresDatabase:
    """asyncpg with a small pool; claims lock their rows and skip the ones other pods hold."""

    claim_lock = " FOR UPDATE OF i SKIP LOCKED"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDatabase:
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "SCANNER_DATABASE_URL names PostgreSQL; install the driver: pip install 'scanner-gateway[postgres]'"
            ) from exc
        return cls(await asyncpg.create_pool(url, min_size=1, max_size=POSTGRES_POOL_SIZE))

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._pool.acquire() as conn:
            return _rowcount(await conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._pool.acquire() as conn:
            await conn.executemany(sql, list(rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._pool.acquire() as conn:
            return [dict(row) for row in await conn.fetch(sql, *args)]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PostgresTransaction(conn)

    async def close(self) -> None:
        await self._pool.close()


class _PostgresTransaction:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, list(rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [dict(row) for row in await self._conn.fetch(sql, *args)]


def _rowcount(status: str) -> int:
    """asyncpg answers a command with its tag: 'UPDATE 3', 'INSERT 0 1'."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


async def open_database(url: str | None, data_dir: Path) -> Database:
    """PostgreSQL when `url` names it; else SQLite at `url` (sqlite:///path) or in the data directory."""
    if url and is_postgres_url(url):
        return await PostgresDatabase.open(url)
    if url:
        if not url.startswith("sqlite:///"):
            raise ValueError(f"SCANNER_DATABASE_URL must be postgresql://... or sqlite:///path; got {url.split(':')[0]}:...")
        return await SqliteDatabase.open(Path(url.removeprefix("sqlite:///")))
    return await SqliteDatabase.open(data_dir / "batches.sqlite3")

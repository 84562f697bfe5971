"""Suite-wide rules.

With SCANNER_REQUIRE_ALL_TESTS=1 (set by .ci/run) a skipped test fails the run: a browser,
tool or engine that went missing must not let a suite pass by running less. Skips that
depend on the machine rather than the project (no Docker daemon, no IPv6 loopback) say
so with a reason starting `optional:` and are allowed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Gateways started by the session's own fixtures keep batch files and their SQLite
# database here, never in the user's data directory; each test gets its own below.
os.environ["SCANNER_DATA_DIR"] = tempfile.mkdtemp(prefix="scanner-test-data-")

OPTIONAL_SKIP = "optional:"
_unexpected_skips: list[str] = []


def _required() -> bool:
    return os.environ.get("SCANNER_REQUIRE_ALL_TESTS") == "1"


@pytest.fixture(autouse=True)
def batch_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory (batch files, the SQLite database) per test: a batch one test
    leaves unfinished is never worked by the next test's gateway."""
    data_dir = tmp_path / "scanner-data"
    monkeypatch.setenv("SCANNER_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server .ci/run starts (scripts/test-postgres.sh
    prints its URL for SCANNER_TEST_DATABASE_URL), dropped after the test."""
    import asyncio
    import uuid

    import asyncpg

    base = os.environ.get("SCANNER_TEST_DATABASE_URL")
    if not base:
        pytest.skip("needs SCANNER_TEST_DATABASE_URL: eval the URL printed by scripts/test-postgres.sh")
    name = f"scanner_t_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or not _required() or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(OPTIONAL_SKIP):
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _unexpected_skips:
        terminalreporter.section("skipped, but SCANNER_REQUIRE_ALL_TESTS=1 wants every test run", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)

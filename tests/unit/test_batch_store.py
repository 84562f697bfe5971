"""The batch store on both databases it runs on: SQLite (a file) and the real PostgreSQL
server (.ci/run starts it). Leases decide who works an item; times are passed in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scanner_gateway.batches.database import open_database
from scanner_gateway.batches.input_lines import InputLine
from scanner_gateway.batches.objects import BatchObject, RequestCounts
from scanner_gateway.batches.store import BatchStore, ItemOutcome

NOW = 1_000_000.0
LEASE = 60.0
OK = ItemOutcome(status_code=200, request_id="r", response_body="{}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'b.sqlite3'}"
    return request.getfixturevalue("postgres_url")


async def open_store(url: str, tmp_path: Path) -> BatchStore:
    store = BatchStore(await open_database(url, tmp_path))
    await store.create_schema()
    return store


async def add_batch(store: BatchStore, batch_id: str, items: int, *, owner: str = "k1", created: int = 1,
                    bad_lines: int = 0) -> None:
    lines = [InputLine(i, f"c{i}", i * 10, 10) for i in range(1, items + 1)]
    lines += [InputLine(items + i, None, 0, 1, "invalid_request", "bad") for i in range(1, bad_lines + 1)]
    batch = BatchObject(id=batch_id, endpoint="/v1/scan", input_file_id="file-1", completion_window="24h",
                        status="in_progress", created_at=created, in_progress_at=created,
                        expires_at=int(NOW) + 3600, request_counts=RequestCounts())
    await store.add_batch(batch, owner, lines)


def run(coro):
    return asyncio.run(coro)


def test_claims_take_each_item_once_until_its_lease_runs_out(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        await add_batch(store, "batch_a", 5)
        first = await store.claim("w1", 3, NOW, LEASE)
        second = await store.claim("w2", 10, NOW, LEASE)
        assert [i.line_no for i in first] == [1, 2, 3]
        assert [i.line_no for i in second] == [4, 5]
        assert await store.claim("w3", 10, NOW + LEASE - 1, LEASE) == []  # all leased
        await store.renew("w2", NOW + 3 * LEASE)  # w2 lives on; w1 died
        # after w1's lease its items go to whoever claims next, with the attempt counted
        again = await store.claim("w3", 10, NOW + LEASE + 1, LEASE)
        assert [(i.line_no, i.attempts) for i in again] == [(1, 2), (2, 2), (3, 2)]
        await store.db.close()

    run(scenario())


def test_only_the_lease_holder_stores_and_a_stored_item_is_never_claimed_again(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        await add_batch(store, "batch_a", 1)
        [item] = await store.claim("w1", 1, NOW, LEASE)
        [taken] = await store.claim("w2", 1, NOW + LEASE + 1, LEASE)  # w1 too slow: its lease ran out
        assert not await store.finish(item, "w1", OK)  # w1's late answer is not stored
        assert await store.finish(taken, "w2", OK)
        assert await store.claim("w3", 1, NOW + 10 * LEASE, LEASE) == []
        batch = await store.get_batch("batch_a", "k1")
        assert batch.request_counts == RequestCounts(total=1, completed=1, failed=0)
        await store.db.close()

    run(scenario())


def test_renewed_leases_are_not_taken(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        await add_batch(store, "batch_a", 2)
        await store.claim("w1", 2, NOW, LEASE)
        assert await store.renew("w1", NOW + 2 * LEASE) == 2
        assert await store.claim("w2", 2, NOW + LEASE + 1, LEASE) == []
        await store.db.close()

    run(scenario())


def test_concurrent_claimers_never_share_an_item(database_url, tmp_path):
    async def scenario() -> None:
        stores = [await open_store(database_url, tmp_path) for _ in range(4)]  # four connections, as four pods
        await add_batch(stores[0], "batch_a", 200)

        async def claim_all(store: BatchStore, worker: str) -> list[int]:
            got: list[int] = []
            while items := await store.claim(worker, 7, NOW, LEASE):
                got += [i.line_no for i in items]
            return got

        claimed = await asyncio.gather(*(claim_all(s, f"w{n}") for n, s in enumerate(stores)))
        every = [line for got in claimed for line in got]
        assert sorted(every) == list(range(1, 201))  # each exactly once
        for store in stores:
            await store.db.close()

    run(scenario())


def test_cancel_fails_the_waiting_items_and_lets_one_worker_finalize(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        await add_batch(store, "batch_a", 3, bad_lines=1)
        [running] = await store.claim("w1", 1, NOW, LEASE)
        assert await store.cancel("batch_a", "k1", int(NOW))
        assert not await store.cancel("batch_a", "k2", int(NOW))  # another key's batch
        await store.close_out(NOW)
        assert await store.finishable() == []  # one still running
        assert await store.finish(running, "w1", OK)
        assert await store.finishable() == ["batch_a"]
        assert await store.claim_finalizing("batch_a", "w1", NOW, LEASE) is not None
        assert await store.claim_finalizing("batch_a", "w2", NOW, LEASE) is None
        rows = await store.item_page("batch_a", 0, 10)
        assert [(r["state"], r["error_code"]) for r in rows] == [
            ("done", None), ("failed", "batch_cancelled"), ("failed", "batch_cancelled"),
            ("failed", "invalid_request")]
        assert await store.finalize("batch_a", "w1", "cancelled", int(NOW), "k1", None, None)
        assert (await store.get_batch("batch_a", "k1")).status == "cancelled"
        await store.db.close()

    run(scenario())


def test_a_batch_past_its_window_expires_its_waiting_items(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        await add_batch(store, "batch_a", 2)
        await store.close_out(NOW + 7200)
        assert await store.claim("w1", 5, NOW + 7200, LEASE) == []
        assert await store.has_expired_items("batch_a")
        assert await store.finishable() == ["batch_a"]
        await store.db.close()

    run(scenario())


def test_keys_see_only_their_batches_newest_first_in_pages(database_url, tmp_path):
    async def scenario() -> None:
        store = await open_store(database_url, tmp_path)
        for n in range(5):
            await add_batch(store, f"batch_{n}", 1, created=n)
        await add_batch(store, "batch_other", 1, owner="k2", created=9)
        page = await store.list_batches("k1", 2, None)
        assert [b.id for b in page] == ["batch_4", "batch_3"]
        page = await store.list_batches("k1", 10, page[-1].id)
        assert [b.id for b in page] == ["batch_2", "batch_1", "batch_0"]
        assert await store.get_batch("batch_other", "k1") is None
        await store.db.close()

    run(scenario())

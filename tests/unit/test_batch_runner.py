"""The batch worker against a real SQLite store and files, with a dispatch of our own in
place of the gateway's routes (what it does with answers is the point here)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from scanner_gateway.batches.database import open_database
from scanner_gateway.batches.file_storage import FileStorage
from scanner_gateway.batches.input_lines import BatchRequest, read_input_file
from scanner_gateway.batches.objects import BatchObject, RequestCounts
from scanner_gateway.batches.runner import Answer, BatchRunner, RunnerSettings, output_line
from scanner_gateway.batches.store import BatchStore

CHAT = "/v1/chat/completions"
DEADLINE_S = 30


async def setup(tmp_path: Path, items: int) -> tuple[BatchStore, FileStorage]:
    store = BatchStore(await open_database(None, tmp_path))
    await store.create_schema()
    storage = FileStorage(tmp_path / "files")
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": {"n": i}}) + "\n"
                    for i in range(items))
    storage.path("file-in").write_text(lines)
    batch = BatchObject(id="batch_x", endpoint=CHAT, input_file_id="file-in", completion_window="24h",
                        status="in_progress", created_at=1, expires_at=2**40, request_counts=RequestCounts())
    await store.add_batch(batch, "owner", read_input_file(storage.path("file-in"), CHAT, max_items=100,
                                                             max_line_bytes=10_000))
    return store, storage


async def states(store: BatchStore) -> dict[str, int]:
    return await store.item_counts()


async def until(probe, what: str) -> None:
    for _ in range(DEADLINE_S * 20):
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_stopping_hands_the_running_items_back_at_once(tmp_path):
    async def scenario() -> None:
        store, storage = await setup(tmp_path, 3)
        never = asyncio.Event()

        async def hang(owner: str, request: BatchRequest) -> Answer:
            await never.wait()
            raise AssertionError("unreachable")

        runner = BatchRunner(store, storage, hang, RunnerSettings(max_in_flight=2, poll_s=0.05))
        runner.start()
        await until(lambda: _has(store, running=2), "two items running")
        await runner.stop()
        rows = await store.db.fetch("SELECT state, attempts, lease_owner FROM batch_items ORDER BY line_no")
        assert rows == [{"state": "pending", "attempts": 0, "lease_owner": None}] * 3
        await store.db.close()

    asyncio.run(scenario())


def test_a_draining_gateway_starts_no_item(tmp_path):
    async def scenario() -> None:
        store, storage = await setup(tmp_path, 2)
        sent: list[str] = []

        async def record(owner: str, request: BatchRequest) -> Answer:
            sent.append(request.custom_id)
            return Answer(200, "r", "{}")

        runner = BatchRunner(store, storage, record, RunnerSettings(poll_s=0.05), stopping=lambda: True)
        runner.start()
        await asyncio.sleep(0.5)  # several polls: none may claim
        await runner.stop()
        assert sent == [] and await states(store) == {"pending": 2}
        await store.db.close()

    asyncio.run(scenario())


def test_answers_are_stored_once_and_the_files_written_in_line_order(tmp_path):
    async def scenario() -> None:
        store, storage = await setup(tmp_path, 4)
        sent: list[str] = []

        async def answer(owner: str, request: BatchRequest) -> Answer:
            sent.append(request.custom_id)
            status = 404 if request.custom_id == "c2" else 200
            return Answer(status, f"req-{request.custom_id}", json.dumps({"n": request.body["n"], "owner": owner}))

        runner = BatchRunner(store, storage, answer, RunnerSettings(max_in_flight=3, poll_s=0.05))
        runner.start()
        await until(lambda: _status(store, "completed"), "the batch completed")
        await runner.stop()
        batch = await store.get_batch("batch_x", "owner")
        assert sorted(sent) == ["c0", "c1", "c2", "c3"]  # each sent once
        output = [json.loads(ln) for ln in storage.path(batch.output_file_id).read_text().splitlines()]
        errors = [json.loads(ln) for ln in storage.path(batch.error_file_id).read_text().splitlines()]
        assert [o["custom_id"] for o in output] == ["c0", "c1", "c3"]
        assert output[1]["response"] == {"status_code": 200, "request_id": "req-c1", "body": {"n": 1, "owner": "owner"}}
        assert errors == [{"id": "batch_req_x_3", "custom_id": "c2", "error": None,
                           "response": {"status_code": 404, "request_id": "req-c2", "body": {"n": 2, "owner": "owner"}}}]
        assert batch.request_counts == RequestCounts(total=4, completed=3, failed=1)
        await store.db.close()

    asyncio.run(scenario())


def test_an_error_line_keeps_its_code_and_message():
    row = {"line_no": 7, "custom_id": None, "status_code": None, "error_code": "invalid_request",
           "error_message": 'line 7: "url" must be…', "request_id": None, "response_body": None}
    assert json.loads(output_line("batch_abc", row)) == {
        "id": "batch_req_abc_7", "custom_id": None, "response": None,
        "error": {"code": "invalid_request", "message": 'line 7: "url" must be…'}}


async def _has(store: BatchStore, running: int) -> bool:
    return (await states(store)).get("running", 0) == running


async def _status(store: BatchStore, status: str) -> bool:
    batch = await store.get_batch("batch_x", None)
    return batch is not None and batch.status == status

"""Files and Batches routes with a FAKE ENGINE, for what a real one cannot do: fail on
cue (engine errors, retried), hold answers (a full gateway, a cancel mid-batch) and record
the priority the gateway sent. The upload-to-output flow is shown on the real engine in
tests/e2e/test_batches_e2e.py; bad files need no engine answer at all."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from tests.api.conftest import FAKE_MODEL, FakeEngine, FakeReply, completion
from tests.batch_lines import CHAT, SCAN, by_custom_id, chat_line, jsonl, parse_jsonl, scan_line

FINAL = ("completed", "failed", "expired", "cancelled")
DEADLINE_S = 60


@pytest.fixture
def batch_client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(upstream_url=fake_engine.url, batch_poll_s=0.1, batch_max_file_bytes=64 * 1024)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def upload(client: TestClient, content: bytes, **headers: str) -> Any:
    return client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                       headers=headers)


def start(client: TestClient, lines: list[dict], endpoint: str = CHAT) -> dict:
    file_id = upload(client, jsonl(lines)).json()["id"]
    answer = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                               "completion_window": "24h"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_final(client: TestClient, batch_id: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def answers(client: TestClient, batch: dict) -> dict[str, dict]:
    def read(file_id: str | None) -> list[dict]:
        return parse_jsonl(client.get(f"/v1/files/{file_id}/content").text) if file_id else []

    return by_custom_id(read(batch["output_file_id"]), read(batch["error_file_id"]))


def error_of(answer: Any) -> dict:
    return answer.json()["error"]


# bad input: clear errors, nothing run


def test_an_upload_must_be_multipart_with_a_batch_purpose(batch_client):
    assert batch_client.post("/v1/files", content=b"{}", headers={"content-type": "application/json"}
                             ).status_code == 415
    missing = batch_client.post("/v1/files", files={"file": ("a.jsonl", b"{}")})
    assert missing.status_code == 400 and error_of(missing)["param"] == "purpose"
    wrong = batch_client.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert wrong.status_code == 400 and "batch" in error_of(wrong)["message"]


def test_an_oversize_upload_gets_413(batch_client):
    too_big = upload(batch_client, b"x" * (64 * 1024 + 2 * 1024 * 1024))
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "payload_too_large"


@pytest.mark.parametrize("content, says", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "not JSONL"),
    (b"", "no requests"),
    (jsonl([chat_line("a", FAKE_MODEL), chat_line("b", FAKE_MODEL), chat_line("a", FAKE_MODEL)]), "lines 1 and 3"),
])
def test_a_file_that_cannot_be_a_batch_gets_400_at_create(batch_client, content, says):
    file_id = upload(batch_client, content).json()["id"]
    answer = batch_client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT})
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["code"] == "invalid_batch_file" and says in error_of(answer)["message"]
    assert batch_client.get("/v1/batches").json()["data"] == []


def test_create_names_a_wrong_endpoint_window_or_file(batch_client):
    file_id = upload(batch_client, jsonl([chat_line("a", FAKE_MODEL)])).json()["id"]
    for body, param in (
        ({"input_file_id": file_id, "endpoint": "/v1/embeddings"}, "endpoint"),
        ({"input_file_id": file_id, "endpoint": CHAT, "completion_window": "1h"}, "completion_window"),
    ):
        answer = batch_client.post("/v1/batches", json=body)
        assert answer.status_code == 400 and error_of(answer)["param"] == param
    missing = batch_client.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": CHAT})
    assert missing.status_code == 404 and error_of(missing)["param"] == "input_file_id"


def test_bad_lines_go_to_the_error_file_and_the_rest_runs(batch_client):
    lines = [chat_line("good", FAKE_MODEL), {"custom_id": "wrong-url", "method": "POST", "url": SCAN, "body": {}}]
    file_id = upload(batch_client, jsonl(lines) + b"{broken\n").json()["id"]
    batch = batch_client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT}).json()
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 2}
    batch = wait_final(batch_client, batch["id"])
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    got = batch_client.get(f"/v1/files/{batch['error_file_id']}/content").text
    errors = parse_jsonl(got)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("wrong-url", "invalid_request"), (None, "invalid_request")]
    assert "line 3" in errors[1]["error"]["message"]
    assert answers(batch_client, batch)["good"]["response"]["status_code"] == 200


def test_an_answer_that_is_an_error_goes_to_the_error_file_with_its_status(batch_client):
    batch = wait_final(batch_client, start(batch_client, [scan_line("no-such-task", task="nope")], SCAN)["id"])
    entry = answers(batch_client, batch)["no-such-task"]
    assert batch["output_file_id"] is None and entry["response"]["status_code"] == 404
    assert entry["response"]["body"]["error"]["code"] == "unknown_task"


# faults and priorities (the fake engine's reasons)


def test_engine_errors_are_tried_again_then_answered(fake_engine, batch_client):
    calls: list[str] = []

    def flaky(payload: dict) -> FakeReply:
        calls.append(payload["messages"][0]["content"])
        if len(calls) == 1:
            return FakeReply.json(503, {"error": {"message": "busy"}})
        return completion("fine")

    fake_engine.answer = flaky
    batch = wait_final(batch_client, start(batch_client, [chat_line("a", FAKE_MODEL)])["id"])
    assert answers(batch_client, batch)["a"]["response"]["status_code"] == 200
    assert len(calls) >= 2


def test_batch_lines_run_at_the_batch_class_whatever_they_ask(fake_engine):
    settings = Settings(upstream_url=fake_engine.url, batch_poll_s=0.1,
                        engine_priorities={"interactive": 0, "batch": 10})
    with TestClient(create_app(settings)) as client:
        batch = start(client, [chat_line("jump", FAKE_MODEL, priority=-100)])
        wait_final(client, batch["id"])
        scan = {"custom_id": "s", "method": "POST", "url": SCAN, "body": {**scan_line("s")["body"],
                                                                            "priority": "interactive"}}
        wait_final(client, start(client, [scan], SCAN)["id"])
    assert [p.get("priority") for p in fake_engine.payloads] == [10, 10]


def test_a_full_gateway_defers_batch_items_instead_of_failing_them(fake_engine):
    held = {"n": 0}

    def slow_first(payload: dict) -> FakeReply:
        held["n"] += 1
        return FakeReply(**{**completion("ok").__dict__, "delay_s": 1.5 if held["n"] == 1 else 0.0})

    fake_engine.answer = slow_first
    settings = Settings(upstream_url=fake_engine.url, batch_poll_s=0.1, max_in_flight_per_replica=1,
                        queue_limit=0)
    with TestClient(create_app(settings)) as client:
        batch = start(client, [chat_line(f"c{i}", FAKE_MODEL) for i in range(3)])
        final = wait_final(client, batch["id"])
        metrics = client.get("/metrics").text
    assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    deferred = [ln for ln in metrics.splitlines() if ln.startswith('scanner_batch_items_total{outcome="deferred"}')]
    assert deferred and float(deferred[0].split()[-1]) >= 1, metrics


def test_cancel_stops_what_has_not_started_and_writes_the_files(fake_engine):
    fake_engine.answer = lambda payload: FakeReply(**{**completion("ok").__dict__, "delay_s": 0.5})
    settings = Settings(upstream_url=fake_engine.url, batch_poll_s=0.1, batch_max_in_flight=1)
    with TestClient(create_app(settings)) as client:
        lines = [chat_line(f"c{i}", FAKE_MODEL) for i in range(6)]
        batch = start(client, lines)
        cancelling = client.post(f"/v1/batches/{batch['id']}/cancel").json()
        assert cancelling["status"] in ("cancelling", "cancelled")
        final = wait_final(client, batch["id"])
        assert final["status"] == "cancelled" and final["cancelled_at"] is not None
        got = answers(client, final)
        again = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert set(got) == {line["custom_id"] for line in lines}
    cancelled = [c for c, e in got.items() if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) >= 4 and final["request_counts"]["failed"] == len(cancelled)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_finished_batches_cannot_be_cancelled_and_files_in_use_cannot_be_deleted(fake_engine):
    fake_engine.answer = lambda payload: FakeReply(**{**completion("ok").__dict__, "delay_s": 0.5})
    settings = Settings(upstream_url=fake_engine.url, batch_poll_s=0.1, batch_max_in_flight=1)
    with TestClient(create_app(settings)) as client:
        batch = start(client, [chat_line("a", FAKE_MODEL), chat_line("b", FAKE_MODEL)])
        busy = client.delete(f"/v1/files/{batch['input_file_id']}")
        assert busy.status_code == 409 and error_of(busy)["code"] == "batch_state_conflict"
        final = wait_final(client, batch["id"])
        late = client.post(f"/v1/batches/{batch['id']}/cancel")
        assert late.status_code == 409
        assert client.delete(f"/v1/files/{final['output_file_id']}").json()["deleted"] is True
        assert client.get(f"/v1/files/{final['output_file_id']}/content").status_code == 404


def test_files_and_batches_need_a_key_and_keys_are_kept_apart(fake_engine):
    settings = Settings(upstream_url=fake_engine.url, api_keys="k1,k2")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/batches").status_code == 401
        assert upload(client, b"{}").status_code == 401
        mine = upload(client, jsonl([chat_line("a", FAKE_MODEL)]), authorization="Bearer k1").json()
        assert client.get(f"/v1/files/{mine['id']}", headers={"authorization": "Bearer k2"}).status_code == 404
        listed = client.get("/v1/files", headers={"authorization": "Bearer k1"}).json()
        assert [f["id"] for f in listed["data"]] == [mine["id"]]
        assert json.loads(client.get(f"/v1/files/{mine['id']}/content",
                                     headers={"authorization": "Bearer k1"}).text)["custom_id"] == "a"

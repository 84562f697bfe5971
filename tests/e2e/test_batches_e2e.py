"""Batch jobs against the real engine: the openai SDK's Files and Batches flow, a gateway
killed with SIGKILL mid-batch and started again, and two gateway processes sharing one
real PostgreSQL server working one batch."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from tests.batch_lines import (
    CHAT,
    SCAN,
    by_custom_id,
    chat_line,
    jsonl,
    parse_jsonl,
    scan_line,
    scan_model_line,
)
from tests.e2e.engine_watch import engine_metric, gateway_metric, wait_until
from tests.helpers import gateway_process, shelf_jpeg

pytestmark = pytest.mark.e2e
BATCH_DEADLINE_S = 400  # 2 shared cores: a scan of the dev model takes seconds
FINAL = ("completed", "failed", "expired", "cancelled")


def wait_done(client: openai.OpenAI, batch_id: str):
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b,
                      f"batch {batch_id} finished", BATCH_DEADLINE_S)


def outputs(client: openai.OpenAI, batch) -> dict[str, dict]:
    output = parse_jsonl(client.files.content(batch.output_file_id).text) if batch.output_file_id else []
    errors = parse_jsonl(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return by_custom_id(output, errors)


def engine_successes(engine_url: str) -> float:
    return engine_metric(engine_url, "vllm:request_success_total")


def test_the_openai_sdk_runs_a_batch_from_upload_to_output_file(gateway_with):
    with gateway_with(api_keys="key-a,key-b", batch_poll_s=0.5) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-a", max_retries=0)
        lines = [chat_line(f"chat-{i}", DEV_SERVED_NAME) for i in range(14)]
        lines += [scan_model_line(f"scan-model-{i}") for i in range(6)]
        upload = client.files.create(file=("nightly.jsonl", jsonl(lines)), purpose="batch")
        assert upload.bytes == len(jsonl(lines)) and upload.purpose == "batch"
        batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h",
                                      metadata={"store": "0042"})
        assert batch.status == "in_progress" and batch.request_counts.total == 20
        scans = client.batches.create(
            input_file_id=client.files.create(file=("scans.jsonl", jsonl([scan_line(f"s{i}") for i in range(3)])),
                                              purpose="batch").id,
            endpoint=SCAN, completion_window="24h")

        # Another key sees none of it.
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="key-b", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(upload.id)
        assert other.batches.list().data == []

        done = wait_done(client, batch.id)
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (20, 0)
        assert done.metadata == {"store": "0042"} and done.error_file_id is None
        answers = outputs(client, done)
        assert set(answers) == {line["custom_id"] for line in lines}
        for custom_id, entry in answers.items():
            assert entry["error"] is None and entry["response"]["status_code"] == 200, entry
            body = entry["response"]["body"]
            assert body["object"] == "chat.completion"
            if custom_id.startswith("scan-model"):  # a scan task's typed result, as the chat answer
                assert body["model"] == "scan/storefront"
                json.loads(body["choices"][0]["message"]["content"])
            else:
                assert body["model"] == DEV_SERVED_NAME

        scans_done = wait_done(client, scans.id)
        assert scans_done.request_counts.completed == 3, scans_done
        for entry in outputs(client, scans_done).values():
            result = entry["response"]["body"]
            assert result["task"] == "storefront" and result["images"][0]["width"] == 320
        page = client.batches.list(limit=1)  # newest first, paged
        assert [b.id for b in page.data] == [scans.id] and page.has_more
        assert [b.id for b in client.batches.list(after=scans.id).data] == [batch.id]


def test_the_batch_cli_submits_a_folder_follows_it_and_downloads_the_answers(gateway_url, tmp_path):
    photos = tmp_path / "store-0042"
    photos.mkdir()
    for seed in (1, 2):
        (photos / f"shelf-{seed}.jpg").write_bytes(shelf_jpeg(320, 240, seed=seed))
    out = tmp_path / "answers"
    done = subprocess.run(
        [sys.executable, "-m", "scanner_gateway", "batch", "submit", str(photos), "--task", "storefront",
         "--url", gateway_url, "--wait", "--out", str(out)],
        capture_output=True, text=True, timeout=BATCH_DEADLINE_S,
    )
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()
    assert batch_id.startswith("batch_") and "completed, 2 done, 0 failed of 2" in done.stderr
    rows = parse_jsonl((out / "output.jsonl").read_text())
    assert sorted(Path(r["custom_id"]).name for r in rows) == ["shelf-1.jpg", "shelf-2.jpg"]
    assert all(r["response"]["body"]["task"] == "storefront" for r in rows)
    assert not (out / "errors.jsonl").exists()
    status = subprocess.run([sys.executable, "-m", "scanner_gateway", "batch", "status", batch_id,
                             "--url", gateway_url], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "completed" in status.stderr


def item_states(database: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM batch_items GROUP BY state").fetchall())


def stored_answers(database: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT custom_id, request_id FROM batch_items WHERE state = 'done'").fetchall())


def test_a_batch_survives_sigkill_of_its_gateway_and_answers_each_request_once(engine, tmp_path):
    data = tmp_path / "data"
    env = {"SCANNER_DATA_DIR": str(data), "SCANNER_BATCH_LEASE_S": "6", "SCANNER_BATCH_POLL_S": "0.5",
           "SCANNER_BATCH_MAX_IN_FLIGHT": "2"}
    # Answers long enough (ignore_eos) that the kill finds requests at the engine.
    lines = [chat_line(f"item-{i}", DEV_SERVED_NAME, max_tokens=96, ignore_eos=True) for i in range(12)]
    before = engine_successes(engine.base_url)
    with gateway_process(engine.base_url, tmp_path / "first.log", **env) as first:
        client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="none", max_retries=0)
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        database = data / "batches.sqlite3"
        wait_until(lambda: (s := item_states(database)).get("done", 0) >= 2 and s.get("running", 0) >= 1,
                   "some items stored and some running", BATCH_DEADLINE_S)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    stored_before_kill = stored_answers(database)
    assert 2 <= len(stored_before_kill) < len(lines)

    with gateway_process(engine.base_url, tmp_path / "second.log", **env) as second:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="none", max_retries=0)
        done = wait_done(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(lines), done
        answers = outputs(client, done)
    assert set(answers) == {line["custom_id"] for line in lines}
    # An answer stored before the kill is the one in the output: its request was not sent again.
    for custom_id, request_id in stored_before_kill.items():
        assert answers[custom_id]["response"]["request_id"] == request_id
    # The engine finished each request once; at most the two killed mid-answer... (aborted,
    # not counted) or finished unseen in the instant before the kill ran again.
    served = engine_successes(engine.base_url) - before
    assert len(lines) <= served <= len(lines) + 2, served


def test_two_gateways_on_one_postgresql_work_one_batch_each_item_once(engine, tmp_path, postgres_url):
    env = {"SCANNER_DATA_DIR": str(tmp_path / "shared-volume"), "SCANNER_DATABASE_URL": postgres_url,
           "SCANNER_BATCH_POLL_S": "0.3", "SCANNER_BATCH_MAX_IN_FLIGHT": "2"}
    lines = [chat_line(f"item-{i}", DEV_SERVED_NAME, max_tokens=48, ignore_eos=True) for i in range(16)]
    before = engine_successes(engine.base_url)
    with gateway_process(engine.base_url, tmp_path / "pod-a.log", **env) as pod_a, \
            gateway_process(engine.base_url, tmp_path / "pod-b.log", **env) as pod_b:
        client_a = openai.OpenAI(base_url=f"{pod_a.url}/v1", api_key="none", max_retries=0)
        upload = client_a.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client_a.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        client_b = openai.OpenAI(base_url=f"{pod_b.url}/v1", api_key="none", max_retries=0)
        done = wait_done(client_b, batch.id)  # either pod answers for the batch
        assert done.status == "completed" and done.request_counts.completed == len(lines), done
        answers = outputs(client_b, done)
        worked = [gateway_metric(pod.url, "scanner_batch_items_total", outcome="done") for pod in (pod_a, pod_b)]
    assert set(answers) == {line["custom_id"] for line in lines}
    assert sum(worked) == len(lines) and min(worked) >= 1, worked  # both pods worked it, no item twice
    assert engine_successes(engine.base_url) - before == len(lines)

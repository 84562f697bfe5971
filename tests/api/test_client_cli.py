"""ScanClient (sync/async) and `scanner-gateway scan`, through a real gateway socket,
in front of a FAKE ENGINE (faults on cue); tests/e2e runs them on the real engine."""

from __future__ import annotations

import asyncio
import codecs
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from scanner_gateway.app import create_app
from scanner_gateway.cli import app as cli
from scanner_gateway.client import AsyncScanClient, ScanClient, ScanError
from scanner_gateway.scan.results import ProductScan
from tests.fake_engine import FakeReply
from tests.helpers import encode, serve_in_thread, shelf_jpeg, shelf_photo

runner = CliRunner()


def said(result) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def gateway(settings):
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_sync_client_returns_a_typed_result(gateway, tmp_path):
    photo = tmp_path / "shelf.jpg"
    photo.write_bytes(shelf_jpeg(640, 480))
    with ScanClient(gateway) as client:
        scan = client.scan(photo, task="product_scan", locale="en")
        assert isinstance(scan.result, ProductScan) and scan.images[0].width == 640
        assert {t["name"] for t in client.tasks()} >= {"product_scan", "price_tags"}
        with pytest.raises(ScanError) as exc:
            client.scan(b"not a photo", task="product_scan")
        assert exc.value.status == 415 and exc.value.code == "unsupported_media_type"


def test_async_client_retries_an_engine_503_with_the_same_idempotency_key(settings, fake_engine):
    # A fake engine: a 503 on cue, which a real engine cannot be asked for.
    answers = iter([FakeReply(503, (b"warming up",))])

    def answer(payload):
        reply = next(answers, None)
        if reply is not None:
            return reply
        from scanner_gateway.scan.schema import sample_instance
        from tests.fake_engine import completion
        return completion(json.dumps(sample_instance(payload["response_format"]["json_schema"]["schema"])))

    fake_engine.answer = answer

    app = create_app(settings)
    keys: list[bytes | None] = []

    async def recording_keys(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/scan":
            keys.append(dict(scope["headers"]).get(b"idempotency-key"))
        await app(scope, receive, send)

    async def main(url):
        async with AsyncScanClient(url, priority="batch") as client:
            return await client.scan(shelf_jpeg(320, 240), task="storefront")

    with serve_in_thread(recording_keys) as url:
        scan = asyncio.run(main(url))
    assert scan.task == "storefront" and len(fake_engine.payloads) == 2
    assert fake_engine.payloads[-1]["priority"] == 10  # batch
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]  # the retry carried the first try's key


def test_scan_cli_writes_rows_resumes_and_fails_loudly(gateway, tmp_path):
    photos = tmp_path / "store-7"
    (photos / "aisle-2").mkdir(parents=True)
    for i in range(3):
        (photos / f"shelf-{i}.jpg").write_bytes(shelf_jpeg(320, 240, seed=i))
    (photos / "aisle-2" / "tags.png").write_bytes(shelf_jpeg(320, 240, seed=9))  # a JPEG named .png: fine
    (photos / "aisle-2" / "IMG_0001.HEIC").write_bytes(encode(shelf_photo(320, 240, seed=4), "HEIF"))  # an iPhone's
    (photos / "aisle-2" / "broken.jpg").write_bytes(shelf_jpeg(320, 240)[:3000])  # cut off mid-upload
    (photos / "notes.txt").write_text("not a photo")
    (photos / "._shelf-0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a Mac's resource-fork stub
    (photos / ".thumbnails").mkdir()
    (photos / ".thumbnails" / "shelf-0.jpg").write_bytes(shelf_jpeg(64, 48))
    out = tmp_path / "audit.jsonl"

    first = runner.invoke(cli, ["scan", str(photos), "--url", gateway, "--out", str(out), "--concurrency", "3"])
    assert first.exit_code == 1, first.output  # one photo failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["task"] for r in rows} == {"product_scan"}
    by_name = {r["file"].rsplit("/", 1)[1]: r for r in rows}
    assert by_name["broken.jpg"]["status"] == "error" and by_name["broken.jpg"]["error_code"] == "invalid_image"
    assert all(by_name[f"shelf-{i}.jpg"]["status"] == "ok" for i in range(3))
    assert by_name["IMG_0001.HEIC"]["status"] == "ok"
    assert "products" in by_name["shelf-0.jpg"]["result"]
    assert "5 scanned, 1 failed" in first.output

    again = runner.invoke(cli, ["scan", str(photos), "--url", gateway, "--out", str(out)])
    assert again.exit_code == 1 and "6 already in" in again.output  # broken.jpg still has no result
    assert len(out.read_text().splitlines()) == 6  # nothing scanned twice

    assert "1 of them failed then; --retry-failed" in said(again)

    retry = runner.invoke(cli, ["scan", str(photos), "--url", gateway, "--out", str(out), "--retry-failed"])
    assert retry.exit_code == 1 and "0 scanned, 1 failed, 5 already in" in retry.output

    # The same photos for another task are other scans: none of them is skipped.
    other = runner.invoke(cli, ["scan", str(photos), "--task", "price_tags", "--url", gateway, "--out", str(out)])
    assert "5 scanned, 1 failed, 0 already in" in said(other)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_scan_cli_resumes_after_a_run_killed_mid_row(gateway, tmp_path, suffix):
    photos = [tmp_path / f"shelf-{i}.jpg" for i in range(3)]
    for i, photo in enumerate(photos):
        photo.write_bytes(shelf_jpeg(320, 240, seed=i))
    out = tmp_path / f"audit{suffix}"
    assert runner.invoke(cli, ["scan", *map(str, photos[:2]), "--url", gateway, "--out", str(out)]).exit_code == 0
    whole = out.read_bytes()
    # Killed halfway through writing the last row, inside its quoted result: left as is,
    # that row would swallow the next one (CSV) or stop the reader (JSON).
    last_row = whole.rfind(b"\n", 0, len(whole) - 1) + 1
    out.write_bytes(whole[: (last_row + len(whole)) // 2])

    resumed = runner.invoke(cli, ["scan", *map(str, photos), "--url", gateway, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "half-written last row" in said(resumed) and "2 scanned, 0 failed, 1 already in" in said(resumed)
    with out.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f)) if suffix == ".csv" else [json.loads(line) for line in f]
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in photos)
    assert {r["status"] for r in rows} == {"ok"}


def test_scan_cli_interrupted_says_how_to_resume(gateway, fake_engine, tmp_path):
    answer = fake_engine.answer
    fake_engine.answer = lambda payload: dataclasses.replace(answer(payload), delay_s=0.3)
    for i in range(30):
        (tmp_path / f"shelf-{i}.jpg").write_bytes(shelf_jpeg(160, 120, seed=i))
    out = tmp_path / "audit.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-m", "scanner_gateway", "scan", str(tmp_path), "--url", gateway, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    deadline = time.monotonic() + 30
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()[0]
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)  # Ctrl-C
    output = run.communicate(timeout=30)[0].decode()
    assert run.returncode == 130, output
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every row written is whole
    assert 2 <= len(rows) < 30 and "run the same command again to resume" in output
    assert f"{len(rows)} row(s) written" in output


def test_scan_cli_csv_and_bad_arguments(gateway, tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(shelf_jpeg(320, 240))
    out = tmp_path / "r.csv"
    ok = runner.invoke(cli, ["scan", str(photo), "--task", "price_tags", "--url", gateway, "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert out.read_bytes().startswith(codecs.BOM_UTF8)  # how Excel knows the file is UTF-8
    row = next(csv.DictReader(out.open(encoding="utf-8-sig")))
    assert row["status"] == "ok" and row["task"] == "price_tags" and "tags" in json.loads(row["result"])

    assert runner.invoke(cli, ["scan", str(photo), "--out", str(tmp_path / "r.xlsx")]).exit_code == 2
    assert runner.invoke(cli, ["scan", str(tmp_path / "nowhere"), "--out", str(out)]).exit_code == 2
    # Runs that cannot scan anything stop before the first photo and write no rows.
    unknown = runner.invoke(cli, ["scan", str(photo), "--task", "nope", "--url", gateway,
                                  "--out", str(tmp_path / "u.jsonl")])
    assert unknown.exit_code == 2 and "unknown task 'nope'" in unknown.output and "price_tags" in unknown.output
    unreachable = runner.invoke(cli, ["scan", str(photo), "--url", "http://127.0.0.1:9",
                                      "--out", str(tmp_path / "u.jsonl")])
    assert unreachable.exit_code == 2 and "cannot use the gateway" in unreachable.output
    assert not (tmp_path / "u.jsonl").exists()


def test_scan_cli_asks_for_a_key_when_the_gateway_wants_one(settings, tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(shelf_jpeg(320, 240))
    with serve_in_thread(create_app(settings.model_copy(update={"api_keys": "k1"}))) as url:
        refused = runner.invoke(cli, ["scan", str(photo), "--url", url, "--out", str(tmp_path / "r.jsonl")])
        assert refused.exit_code == 2 and "--api-key" in refused.output
        ok = runner.invoke(cli, ["scan", str(photo), "--url", url, "--api-key", "k1", "--task", "storefront",
                                 "--out", str(tmp_path / "r.jsonl")])
        assert ok.exit_code == 0, ok.output


def test_client_takes_the_openai_base_url_too(gateway):
    with ScanClient(f"{gateway}/v1/") as client:
        assert {t["name"] for t in client.tasks()} >= {"price_tags", "storefront"}


def test_client_reports_an_unreachable_gateway():
    with ScanClient("http://127.0.0.1:9", retries=1) as client, pytest.raises(ScanError) as exc:
        client.scan(shelf_jpeg(64, 48), task="storefront")
    assert exc.value.status is None and exc.value.code == "connection_error"

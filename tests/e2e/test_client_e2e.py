"""ScanClient and the bulk `scan` CLI against the gateway in front of the real engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from scanner_gateway.cli import app as cli
from scanner_gateway.client import AsyncScanClient, ScanClient
from scanner_gateway.scan.results import PriceTags, ShelfAudit
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e


def test_scan_client_and_bulk_cli_on_the_real_engine(gateway_url, tmp_path):
    with ScanClient(gateway_url) as client:
        scan = client.scan(shelf_jpeg(800, 600, seed=3), task="price_tags", locale="en")
    assert isinstance(scan.result, PriceTags) and scan.model.startswith("scanner-dev")

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(shelf_jpeg(640, 480, seed=20 + i))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["scan", str(folder), "--task", "storefront", "--url", gateway_url,
                                      "--out", str(out), "--concurrency", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"] and all("shop_name" in r["result"] for r in rows)


def test_async_client_scans_several_photos_at_once(gateway_url):
    photos = [shelf_jpeg(640, 480, seed=30 + i) for i in range(3)]

    async def main():
        async with AsyncScanClient(gateway_url, priority="batch") as client:
            return await asyncio.gather(*(client.scan(p, task="shelf_audit", locale="en") for p in photos))

    scans = asyncio.run(main())
    assert [type(s.result) for s in scans] == [ShelfAudit] * 3
    assert len({s.id for s in scans}) == 3 and all(s.images[0].width == 640 for s in scans)

"""ScanClient and the bulk `scan` CLI against the gateway in front of the real engine."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from scanner_gateway.cli import app as cli
from scanner_gateway.client import ScanClient
from scanner_gateway.scan.results import PriceTags
from tests.helpers import shelf_jpeg


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

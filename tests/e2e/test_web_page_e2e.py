"""The scan terminal page in headless Chromium in front of the real engine: what a store
clerk sees for a real scan (the dev model's words are nonsense; every field is real).
Its screenshot is the README's (docs/screenshots/scan-terminal.png is copied from
artifacts/scan-terminal-real-engine-product_scan.png)."""

from __future__ import annotations

import shutil

import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from tests.api.test_web_page import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.helpers import shelf_jpeg

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]


def boxes_of(node) -> int:
    if isinstance(node, dict):
        return int(node.get("box") is not None) + sum(boxes_of(v) for v in node.values())
    if isinstance(node, list):
        return sum(boxes_of(v) for v in node)
    return 0


@pytest.mark.parametrize("task", ["product_scan", "storefront"])
def test_a_real_scan_in_the_browser(gateway_url, task, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "shelf.jpg"
    photo.write_bytes(shelf_jpeg(1600, 1200, seed=5))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{gateway_url}/?task={task}")
        page.wait_for_selector(f"#task option[value={task}]", state="attached")
        page.set_input_files("#photos", str(photo))
        with page.expect_response("**/v1/scan", timeout=300_000) as answer:
            page.click("#scan-button")
        scan = answer.value.json()
        assert answer.value.status == 200, scan
        page.wait_for_function("document.querySelector('#status').textContent.includes('done at')")

        facts = page.locator("#result dt").all_inner_texts()
        for key, value in scan["result"].items():
            shown_as_table = isinstance(value, list) and value and isinstance(value[0], dict)
            assert shown_as_table or key.replace("_", " ") in facts
        assert page.locator(".bbox").count() == boxes_of(scan["result"])
        assert f"model {DEV_SERVED_NAME}" in page.locator("#result").inner_text()
        assert page.locator("#history li").count() == 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"scan-terminal-real-engine-{task}.png"), full_page=True)
        browser.close()


def test_the_page_lists_a_keys_batches_and_downloads_their_answers(gateway_with, tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    from tests.batch_lines import chat_line, jsonl

    with gateway_with(api_keys="store-key,other-key", batch_poll_s=0.5) as url:
        key = {"authorization": "Bearer store-key"}
        upload = httpx.post(f"{url}/v1/files", files={"file": ("in.jsonl", jsonl([chat_line("shelf-7", DEV_SERVED_NAME)]))},
                            data={"purpose": "batch"}, headers=key).json()
        batch = httpx.post(f"{url}/v1/batches", json={"input_file_id": upload["id"],
                                                      "endpoint": "/v1/chat/completions"}, headers=key).json()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.eval_on_selector("#key-box", "box => { box.open = true; }")
            page.fill("#api-key", "other-key")
            page.click("#save-key")
            page.wait_for_function("document.querySelector('#batches').textContent.includes('No batches yet')")
            page.fill("#api-key", "store-key")
            page.click("#save-key")
            page.wait_for_selector(f"#batches li:has-text('{batch['id']}')")
            for _ in range(120):  # until the batch is done (one short answer)
                page.click("#refresh-batches")
                if page.locator(f"#batches li:has-text('{batch['id']}'):has-text('completed')").count():
                    break
                page.wait_for_timeout(1000)
            row = page.locator(f"#batches li:has-text('{batch['id']}')")
            assert "1 done, 0 failed of 1" in row.inner_text()
            with page.expect_download() as download:
                row.locator("button:has-text('output')").click()
            saved = tmp_path / "output.jsonl"
            download.value.save_as(saved)
            assert '"custom_id": "shelf-7"' in saved.read_text()
            browser.close()

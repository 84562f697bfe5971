"""The scan terminal page in a real headless Chromium (Debian's), driven by Playwright.

The gateway runs on a real socket in front of a FAKE ENGINE whose answer has known boxes
(random-weight models give no boxes worth checking positions of). A screenshot of the
page with its result is kept in artifacts/ (SCANNER_ARTIFACTS_DIR).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from scanner_gateway.app import create_app
from tests.fake_engine import completion
from tests.helpers import encode, serve_in_thread, shelf_jpeg, shelf_photo

CHROMIUM = os.environ.get("SCANNER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SCANNER_ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "artifacts"))
# Chromium on these machines: no sandbox as root, and no background calls to the internet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER = {"products": [
    {"name": "Cola 330ml", "brand": "Cola", "category": "beverage", "package": "can", "facings": 4,
     "price": "3.50", "currency": "CNY", "image": 0, "bbox_2d": [100, 200, 300, 600]},
    {"name": "Green tea", "brand": None, "category": "beverage", "package": "bottle", "facings": 2,
     "price": None, "currency": None, "image": 0, "bbox_2d": [500, 100, 900, 500]},
]}

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture
def page(settings, fake_engine):
    from playwright.sync_api import sync_playwright

    fake_engine.answer = lambda _: completion(json.dumps(ANSWER))
    with serve_in_thread(create_app(settings)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        yield page
        browser.close()


def test_upload_scan_and_see_table_and_boxes(page, fake_engine, tmp_path):
    photo = tmp_path / "shelf.jpg"
    photo.write_bytes(shelf_jpeg(1600, 1200, seed=5))
    page.wait_for_selector("#task option[value=product_scan]", state="attached")
    page.select_option("#task", "product_scan")
    page.set_input_files("#photos", str(photo))
    with page.expect_response("**/v1/scan") as answer:
        page.click("#scan-button")
    page.wait_for_selector(".result table")

    # The browser shrank the 1600x1200 photo to product_scan's size (1024x768), and the
    # gateway sent it to the engine as it came, without decoding and encoding it again.
    sent = answer.value.json()["images"][0]
    assert (sent["width"], sent["height"]) == (sent["sent_width"], sent["sent_height"]) == (1024, 768)
    assert sent["bytes"] < photo.stat().st_size
    engine_photo = _engine_photo(fake_engine)
    assert len(engine_photo) == sent["bytes"] and Image.open(io.BytesIO(engine_photo)).size == (1024, 768)
    assert "shrunk here from" in page.locator("#status").inner_text()

    headers = page.locator(".result th").all_inner_texts()
    assert "name" in headers and "facings" in headers
    cells = page.locator(".result td").all_inner_texts()
    assert "Cola 330ml" in cells and "Green tea" in cells

    boxes = page.locator(".bbox")
    assert boxes.count() == 2
    img = page.locator(".photo img").bounding_box()
    first = boxes.nth(0).bounding_box()
    # bbox_2d [100, 200, 300, 600] of 1000 -> 10%..30% across, 20%..60% down the photo.
    assert first["x"] - img["x"] == pytest.approx(0.10 * img["width"], abs=4)
    assert first["y"] - img["y"] == pytest.approx(0.20 * img["height"], abs=4)
    assert first["width"] == pytest.approx(0.20 * img["width"], abs=6)
    assert page.locator("#history li").count() == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "scan-terminal.png"), full_page=True)


def _engine_photo(fake_engine) -> bytes:
    url = fake_engine.payloads[-1]["messages"][1]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.partition(",")[2])


def test_with_shrinking_off_the_photo_goes_up_whole(page, fake_engine, tmp_path):
    photo = tmp_path / "shelf.png"  # a lossless photo: the gateway's sizing is then the only loss
    photo.write_bytes(encode(shelf_photo(1600, 1200, seed=7), "PNG"))
    page.wait_for_selector("#task option[value=product_scan]", state="attached")
    page.select_option("#task", "product_scan")
    page.uncheck("#shrink")
    page.set_input_files("#photos", str(photo))
    with page.expect_response("**/v1/scan") as answer:
        page.click("#scan-button")
    page.wait_for_selector(".result table")
    sent = answer.value.json()["images"][0]
    assert (sent["format"], sent["width"], sent["height"], sent["bytes"]) == ("PNG", 1600, 1200, photo.stat().st_size)
    assert Image.open(io.BytesIO(_engine_photo(fake_engine))).size == (1024, 768)
    assert "shrunk" not in page.locator("#status").inner_text()


def test_an_iphone_heic_photo_gets_its_boxes_on_a_blank_frame(page, tmp_path):
    # Chromium cannot display HEIC; the scan still works and the boxes keep their places.
    photo = tmp_path / "IMG_0042.HEIC"
    photo.write_bytes(encode(shelf_photo(1600, 1200, seed=6), "HEIF"))
    page.wait_for_selector("#task option[value=product_scan]", state="attached")
    page.select_option("#task", "product_scan")
    page.set_input_files("#photos", str(photo))
    page.click("#scan-button")
    page.wait_for_selector(".result table")
    blank = page.locator(".photo-blank")
    blank.wait_for(state="visible")
    assert "HEIF" in blank.inner_text()
    frame = blank.bounding_box()
    assert frame["width"] / frame["height"] == pytest.approx(1600 / 1200, rel=0.02)
    first = page.locator(".bbox").nth(0).bounding_box()
    assert first["x"] - frame["x"] == pytest.approx(0.10 * frame["width"], abs=4)


def test_errors_are_shown_clearly(page, tmp_path):
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("these are notes, not a photo")
    page.wait_for_selector("#task option[value=price_tags]", state="attached")
    page.set_input_files("#photos", str(not_a_photo))
    page.click("#scan-button")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "unsupported_media_type" in error.inner_text() and "not a photo the scanner reads" in error.inner_text()


def test_the_task_is_product_scan_then_the_last_used_or_the_links(page):
    def chosen() -> str:
        page.wait_for_selector("#task option", state="attached")
        return page.locator("#task").input_value()

    assert chosen() == "product_scan"  # not merely the first in the list (kitchen_compliance)
    page.select_option("#task", "price_tags")
    page.reload()
    assert chosen() == "price_tags"  # a store that scans price tags all day keeps that task
    page.goto(page.url.split("?")[0] + "?task=shelf_audit")
    assert chosen() == "shelf_audit"  # a bookmark or kiosk link names its task
    page.goto(page.url.split("?")[0] + "?task=nope")
    assert chosen() == "price_tags"  # an unknown name in a link is passed over


def test_phone_width_and_keyboard(page):
    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_selector("#task option", state="attached")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "task"  # the form starts the tab order


def test_api_docs_render_with_no_internet_and_keys_on(settings):
    """/docs and /redoc in a browser that may reach nothing but the gateway (a store's
    closed network): both must render from files the gateway serves itself."""
    from playwright.sync_api import sync_playwright

    keyed = settings.model_copy(update={"api_keys": "store-key"})
    with serve_in_thread(create_app(keyed)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        elsewhere: list[tuple[str, str]] = []
        failed: list[str] = []

        def only_the_gateway(route):
            if route.request.url.startswith(url):
                route.continue_()
            else:
                elsewhere.append((route.request.resource_type, route.request.url))
                route.abort()

        page.route("**/*", only_the_gateway)
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(url + "/docs")
        page.wait_for_selector(".opblock-summary-path[data-path='/v1/scan']", timeout=15_000)
        page.goto(url + "/redoc")
        page.wait_for_function("document.body.innerText.includes('/v1/scan')", timeout=15_000)
        browser.close()
    assert failed == []
    # Nothing the pages need comes from outside; ReDoc's own "by Redocly" badge image does.
    assert [what for what, _ in elsewhere] in ([], ["image"]), elsewhere

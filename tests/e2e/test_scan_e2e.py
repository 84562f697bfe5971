"""Every task end to end against real vLLM: schema-constrained decoding, validation, boxes."""

import base64
import codecs
import json

import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from scanner_gateway.scan.results import RESULT_MODELS
from tests.api.test_scan_api import BAD_INPUTS
from tests.helpers import encode, shelf_jpeg, shelf_photo

pytestmark = pytest.mark.e2e


def boxes(node):
    if isinstance(node, dict):
        if "box" in node and node["box"] is not None:
            yield node["image"], node["box"]
        for value in node.values():
            yield from boxes(value)
    elif isinstance(node, list):
        for value in node:
            yield from boxes(value)


def check_result(body, task, images):
    assert body["task"] == task and body["model"] == DEV_SERVED_NAME
    model = RESULT_MODELS[task]
    fields = set(model.model_fields)
    typed = model.model_validate({k: v for k, v in body["result"].items() if k in fields})
    # The answer is the typed result as the gateway built it, summaries (totals, counts) included.
    assert typed.model_dump(mode="json") == body["result"]
    assert [(i["width"], i["height"]) for i in body["images"]] == images
    for index, box in boxes(body["result"]):
        width, height = images[index]
        assert 0 <= box["x1"] < box["x2"] <= width and 0 <= box["y1"] < box["y2"] <= height
    assert body["usage"]["completion_tokens"] > 0
    assert body["timings_ms"]["engine"] > 0


@pytest.mark.parametrize(("seed", "task"), list(enumerate(sorted(RESULT_MODELS))))
def test_each_task_over_multipart(gateway, seed, task):
    photo = shelf_jpeg(1600, 1200, seed=seed)
    r = gateway.post("/v1/scan", files={"image": ("shelf.jpg", photo, "image/jpeg")},
                     data={"task": task, "locale": "en"})
    assert r.status_code == 200, r.text
    check_result(r.json(), task, [(1600, 1200)])


def test_json_body_two_photos_zh(gateway):
    a = shelf_jpeg(4000, 3000, seed=11)  # a 12 MP phone photo
    b = encode(shelf_photo(600, 800, seed=12).convert("RGBA"), "PNG")
    r = gateway.post("/v1/scan", json={
        "task": "price_tags",
        "images": ["data:image/jpeg;base64," + base64.b64encode(a).decode(), base64.b64encode(b).decode()],
        "locale": "zh",
    })
    assert r.status_code == 200, r.text
    body = r.json()
    check_result(body, "price_tags", [(4000, 3000), (600, 800)])
    sent = body["images"][0]
    assert sent["sent_width"] * sent["sent_height"] <= 1228800


def _data_url(photo: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(photo).decode()


PHOTO = shelf_jpeg(800, 600, seed=13)
HEIC = encode(shelf_photo(800, 600, seed=13), "HEIF")
# Every way the README says a photo may be sent, each once against the real engine.
GOOD_INPUTS = [
    ("json-bare-base64", 1, {"json": {"task": "storefront", "images": [base64.b64encode(PHOTO).decode()]}}),
    ("json-with-bom", 1, {"content": codecs.BOM_UTF8 + json.dumps({"task": "storefront", "images": [_data_url(PHOTO)]}).encode(),
                       "headers": {"content-type": "application/json"}}),
    ("json-openai-parts", 2, {"json": {"task": "storefront", "images": [
        {"url": _data_url(PHOTO)}, {"type": "image_url", "image_url": {"url": _data_url(PHOTO), "detail": "high"}}]}}),
    ("photo-as-body", 1, {"content": PHOTO, "params": {"task": "storefront"}, "headers": {"content-type": "image/jpeg"}}),
    ("iphone-heic", 1, {"files": {"image": ("IMG_0042.HEIC", HEIC, "image/heic")}, "data": {"task": "storefront"}}),
]


@pytest.mark.parametrize(("what", "photos", "kwargs"), GOOD_INPUTS, ids=[g[0] for g in GOOD_INPUTS])
def test_every_way_to_send_a_photo(gateway, what, photos, kwargs):
    r = gateway.post("/v1/scan", **kwargs)
    assert r.status_code == 200, r.text
    check_result(r.json(), "storefront", [(800, 600)] * photos)


@pytest.mark.parametrize(("what", "kwargs", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_against_the_real_stack(gateway, what, kwargs, status, code):
    r = gateway.post("/v1/scan", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code

import base64
import gzip
import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from scanner_gateway.scan.results import ProductScan
from tests.fake_engine import FAKE_MODEL, FakeReply, completion
from tests.helpers import encode, serve_in_thread, shelf_jpeg

PHOTO = shelf_jpeg(1600, 1200, seed=5)
VALID_PRODUCTS = json.dumps({"products": [
    {"name": "Cola 330ml", "brand": "Cola", "category": "beverage", "package": "can", "facings": 4,
     "price": "3.50", "currency": "CNY", "image": 0, "bbox_2d": [100, 200, 300, 600]},
]})


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


def test_multipart_scan_returns_typed_result_with_pixel_boxes(client, fake_engine):
    # Fake engine: an answer with known boxes, to check their pixels (random weights give none worth checking).
    fake_engine.answer = lambda _: completion(VALID_PRODUCTS)
    r = client.post("/v1/scan", files={"image": ("shelf.jpg", PHOTO, "image/jpeg")},
                    data={"task": "product_scan", "locale": "en"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "product_scan" and body["model"] == FAKE_MODEL and body["locale"] == "en"
    assert body["images"][0]["width"] == 1600 and body["images"][0]["height"] == 1200
    product = body["result"]["products"][0]
    assert product["box"] == {"x1": 160, "y1": 240, "x2": 480, "y2": 720}
    assert product["price"] == 3.5 and body["result"]["total_facings"] == 4
    ProductScan.model_validate({"products": body["result"]["products"]})
    assert body["usage"]["total_tokens"] == 15
    assert set(body["timings_ms"]) == {"preprocess", "engine", "total"}


def test_engine_request_is_schema_constrained(client, fake_engine):
    # Fake engine: it records the exact request the gateway sent, which vLLM does not show.
    client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"})
    payload = fake_engine.payloads[0]
    assert payload["model"] == FAKE_MODEL and payload["temperature"] == 0.0
    assert payload["response_format"]["type"] == "json_schema"
    assert payload["response_format"]["json_schema"]["strict"] is True
    assert not any(k.startswith("guided_") for k in payload)
    parts = payload["messages"][1]["content"]
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    sent = Image.open(__import__("io").BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.width % 32 == 0 and sent.height % 32 == 0
    assert payload["messages"][0]["role"] == "system"


def test_json_images_as_objects_copied_from_openai_parts(client, fake_engine):
    # Fake engine: it records the image parts the gateway sent (the real stack: tests/e2e/test_scan_e2e.py).
    url = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    images = [{"url": url}, {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
              {"type": "input_image", "image_url": url}]
    r = client.post("/v1/scan", json={"task": "shelf_audit", "images": images})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3
    sent = [p for p in fake_engine.payloads[-1]["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(sent) == 3

    r = client.post("/v1/scan", json={"task": "shelf_audit", "images": [{"data": url}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "images.0"
    assert '"url"' in r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream"])
def test_photo_as_the_body_with_task_in_the_query(client, fake_engine, content_type):
    # What camera firmware and `curl --data-binary @photo.jpg` send. Fake engine: known boxes,
    # to check they come back in the original's pixels (the real stack: tests/e2e/test_readme.py).
    fake_engine.answer = lambda _: completion(VALID_PRODUCTS)
    r = client.post("/v1/scan", content=PHOTO, params={"task": "product_scan", "locale": "en"},
                    headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "product_scan" and body["locale"] == "en"
    assert body["images"][0]["width"] == 1600 and body["result"]["products"][0]["box"]["x1"] == 160


def test_iphone_heic_and_avif_uploads_are_scanned_as_jpeg(client, fake_engine):
    # Fake engine: it records that the engine got JPEGs (the real stack: tests/e2e/test_scan_e2e.py).
    photo = Image.open(__import__("io").BytesIO(PHOTO))
    r = client.post("/v1/scan", files=[("image", ("IMG_0042.HEIC", encode(photo, "HEIF"), "image/heic")),
                                       ("image", ("shelf.avif", encode(photo, "AVIF"), "image/avif"))],
                    data={"task": "shelf_audit"})
    assert r.status_code == 200, r.text
    assert [img["format"] for img in r.json()["images"]] == ["HEIF", "AVIF"]
    parts = fake_engine.payloads[-1]["messages"][1]["content"]
    assert [p["image_url"]["url"][:23] for p in parts if p["type"] == "image_url"] == ["data:image/jpeg;base64,"] * 2


def test_truncated_answer_is_retried_with_more_tokens(client, fake_engine):
    answers = iter([completion('{"products":[{"name":"Co', "length"), completion(VALID_PRODUCTS)])
    fake_engine.answer = lambda _: next(answers)
    r = client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "product_scan"})
    assert r.status_code == 200, r.text
    first, second = fake_engine.payloads
    assert second["max_tokens"] == 2 * first["max_tokens"]
    assert any("retried" in w for w in r.json()["warnings"])
    assert r.json()["usage"]["total_tokens"] == 30


def test_invalid_answer_twice_is_502_with_raw_text(client, fake_engine):
    fake_engine.answer = lambda _: completion('{"products": "nope"}')
    r = client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "product_scan"})
    err = assert_error(r, 502, "model_output_invalid")
    assert "nope" in err["message"]
    assert len(fake_engine.payloads) == 2


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (FakeReply(drop=True), 503, "upstream_unavailable"),
        (FakeReply.json(500, {"error": {"message": "CUDA out of memory", "type": "x", "code": 500}}),
         502, "engine_error"),
        (FakeReply(503, (b"overloaded",)), 503, "upstream_unavailable"),
        (FakeReply(200, (b"<html>proxy</html>",), {"content-type": "text/html"}), 502, "engine_error"),
        # vLLM's answer when SCANNER_UPSTREAM_API_KEY is not its --api-key: the operator's fault
        (FakeReply.json(401, {"error": "Unauthorized"}), 502, "engine_auth_failed"),
    ],
)
def test_engine_faults_map_to_5xx(client, fake_engine, fault, status, code):
    fake_engine.answer = lambda _: fault
    r = client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "price_tags"})
    err = assert_error(r, status, code)
    if fault.status == 500:
        assert "CUDA out of memory" in err["message"]


def test_a_scan_follows_the_engines_to_a_new_model(client, fake_engine, caplog):
    fake_engine.strict_model = True
    scan = {"files": {"image": ("a.jpg", PHOTO)}, "data": {"task": "storefront"}}
    assert client.post("/v1/scan", **scan).status_code == 200
    fake_engine.model = "ostrakon-vl-8b-v2"  # the engines were upgraded under a running gateway
    with caplog.at_level("WARNING", logger="scanner_gateway.upstream.pool"):
        for _ in range(2):
            assert client.post("/v1/scan", **scan).status_code == 200
    assert [p["model"] for p in fake_engine.payloads] == [FAKE_MODEL, FAKE_MODEL, "ostrakon-vl-8b-v2",
                                                           "ostrakon-vl-8b-v2"]
    assert sum("now serve 'ostrakon-vl-8b-v2'" in r.getMessage() for r in caplog.records) == 1


def test_a_configured_model_the_engine_does_not_serve_is_a_502_naming_it(fake_engine):
    fake_engine.strict_model = True
    settings = Settings(upstream_url=fake_engine.url, model="not-served")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"})
    err = assert_error(r, 502, "engine_error")
    assert "not-served" in err["message"] and len(fake_engine.payloads) == 1


def test_slow_engine_is_504(settings, fake_engine):
    fake_engine.answer = lambda _: FakeReply(delay_s=2.0)
    with TestClient(create_app(settings.model_copy(update={"engine_read_timeout_s": 0.3}))) as c:
        r = c.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "price_tags"})
    assert_error(r, 504, "upstream_timeout")


BAD_INPUTS = [
    # (description, request kwargs, status, code)
    ("unknown task", dict(files={"image": ("a.jpg", PHOTO)}, data={"task": "nope"}), 404, "unknown_task"),
    ("missing task", dict(files={"image": ("a.jpg", PHOTO)}), 400, "invalid_request"),
    ("no image", dict(files={"task": (None, "product_scan")}), 400, "invalid_request"),
    ("form-urlencoded", dict(data={"task": "product_scan"}), 415, "unsupported_media_type"),
    ("wrong field name", dict(files={"file": ("a.jpg", PHOTO)}, data={"task": "product_scan"}), 400, "invalid_request"),
    ("bad locale", dict(files={"image": ("a.jpg", PHOTO)}, data={"task": "product_scan", "locale": "fr"}),
     400, "invalid_request"),
    ("too many images", dict(files=[("image", ("a.jpg", PHOTO))] * 3, data={"task": "storefront"}),
     400, "invalid_request"),
    ("text not image", dict(files={"image": ("a.jpg", b"hello world")}, data={"task": "product_scan"}),
     415, "unsupported_media_type"),
    ("pdf", dict(files={"image": ("a.pdf", encode(Image.new("RGB", (9, 9)), "PDF"))}, data={"task": "storefront"}),
     415, "unsupported_media_type"),
    ("truncated jpeg", dict(files={"image": ("a.jpg", PHOTO[:3000])}, data={"task": "product_scan"}),
     422, "invalid_image"),
    ("empty file", dict(files={"image": ("a.jpg", b"")}, data={"task": "product_scan"}), 422, "invalid_image"),
    ("image over byte limit", dict(files={"image": ("a.jpg", PHOTO + b"\0" * (2 * 1024 * 1024))},
                                   data={"task": "product_scan"}), 413, "image_too_large"),
    ("pixel bomb", dict(files={"image": ("b.png", encode(Image.new("1", (12000, 12000)), "PNG"))},
                        data={"task": "product_scan"}), 413, "image_too_large"),
    ("plain text body", dict(content=b"hi", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("raw photo, no task", dict(content=PHOTO, headers={"content-type": "image/jpeg"}), 400, "invalid_request"),
    ("raw photo, unknown query", dict(content=PHOTO, headers={"content-type": "image/jpeg"},
                                      params={"task": "product_scan", "tsak": "x"}), 400, "invalid_request"),
    ("raw photo, bad priority", dict(content=PHOTO, headers={"content-type": "image/jpeg"},
                                     params={"task": "product_scan", "priority": "now"}), 400, "invalid_request"),
    ("raw photo, task twice", dict(content=PHOTO, headers={"content-type": "image/jpeg"},
                                   params=[("task", "storefront"), ("task", "price_tags")]), 400, "invalid_request"),
    ("form task twice", dict(files=[("image", ("a.jpg", PHOTO)), ("task", (None, "storefront")),
                                    ("task", (None, "price_tags"))]), 400, "invalid_request"),
    ("raw body not a photo", dict(content=b"hello", headers={"content-type": "application/octet-stream"},
                                  params={"task": "product_scan"}), 415, "unsupported_media_type"),
    ("raw body empty", dict(content=b"", headers={"content-type": "image/png"}, params={"task": "product_scan"}),
     422, "invalid_image"),
    ("json not object", dict(content=b"[1,2]", headers={"content-type": "application/json"}), 400, "invalid_request"),
    ("json broken", dict(content=b'{"task":', headers={"content-type": "application/json"}), 400, "invalid_request"),
    ("json no images", dict(json={"task": "product_scan", "images": []}), 400, "invalid_request"),
    ("json bad base64", dict(json={"task": "product_scan", "images": ["%%%"]}), 422, "invalid_image"),
    ("json image url", dict(json={"task": "product_scan", "images": ["http://x/y.jpg"]}), 400, "invalid_request"),
    ("json extra field", dict(json={"task": "product_scan", "images": ["AAAA"], "colour": 1}), 400, "invalid_request"),
]


@pytest.mark.parametrize(("what", "kwargs", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_documented_4xx(client, fake_engine, what, kwargs, status, code):
    r = client.post("/v1/scan", **kwargs)
    assert_error(r, status, code)
    assert fake_engine.payloads == []  # nothing bad ever reaches the engine


def test_validation_error_lists_every_problem(client):
    # A misspelt field is two problems; only both together say what to fix.
    error = assert_error(client.post("/v1/scan", json={"task": "price_tags", "image": "AAAA"}),
                         400, "invalid_request")
    assert "images: Field required" in error["message"]
    assert "image: Extra inputs are not permitted" in error["message"]
    assert error["param"] == "images"


@pytest.mark.parametrize("path", ["/v1/scan", "/v1/chat/completions"])
def test_compressed_bodies_are_415_not_invalid_json(client, fake_engine, path):
    body = gzip.compress(json.dumps({"task": "storefront", "model": "m", "messages": []}).encode())
    r = client.post(path, content=body, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert assert_error(r, 415, "unsupported_media_type")["param"] == "content-encoding"
    assert not [got for got in fake_engine.received if got.path == path]  # vLLM would not decompress it either
    ok = client.post("/v1/chat/completions", json={"model": "m", "messages": []},
                     headers={"content-encoding": "identity"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", ["/v1/scan", "/v1/chat/completions"])
def test_a_stalled_upload_is_408_and_its_connection_closed(settings, path):
    with serve_in_thread(create_app(settings.model_copy(update={"body_timeout_s": 0.5}))) as url:
        with socket.create_connection(url.removeprefix("http://").split(":")) as sock:
            # 1000 bytes promised, 9 sent, then nothing (a dead uplink, or a slowloris)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n{\"task\": ".encode())
            sock.settimeout(10)
            answer = b""
            while chunk := sock.recv(65536):  # until the gateway closes the connection
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "body_timeout"


def test_the_body_deadline_does_not_cut_a_slow_answer(settings, fake_engine):
    fake_engine.answer = lambda _: FakeReply(200, (b'{"ok": true}',), delay_s=1.0)  # answer after the body deadline
    with TestClient(create_app(settings.model_copy(update={"body_timeout_s": 0.3}))) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 200 and r.json() == {"ok": True}


def test_request_body_cap_is_413_before_reading(client):
    r = client.post("/v1/scan", content=b"x", headers={"content-type": "application/json",
                                                       "content-length": str(10**10)})
    assert_error(r, 413, "payload_too_large")


def test_routing_errors_use_the_same_shape(client):
    error = assert_error(client.post("/v1/embeddings", json={}), 404, "not_found")
    assert "POST /v1/embeddings" in error["message"] and "/docs" in error["message"]
    r = client.delete("/v1/scan")
    error = assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 names the methods that work
    assert error["message"] == "DELETE is not allowed on /v1/scan; use POST"
    # Uptime monitors probe with HEAD: the page and the probes answer it.
    assert [client.head(path).status_code for path in ("/", "/health", "/ready")] == [200, 200, 200]


def test_tasks_listing(client):
    body = client.get("/v1/tasks").json()
    names = {t["name"] for t in body["data"]}
    assert names == {"product_scan", "shelf_audit", "price_tags", "storefront", "kitchen_compliance"}
    task = client.get("/v1/tasks/price_tags").json()
    assert task["engine_schema"]["properties"]["tags"]["maxItems"] > 0
    assert "tag_count" in json.dumps(task["result_schema"])
    assert_error(client.get("/v1/tasks/nope"), 404, "unknown_task")


def test_errors_quote_a_clients_long_values_cut_short(client):
    long = "x" * 5000
    for response, code in [
        (client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": long}), "unknown_task"),
        (client.post("/v1/scan", files={"image": ("a.jpg", PHOTO), long[:300]: ("b.jpg", PHOTO)},
                     data={"task": "storefront"}), "invalid_request"),
        (client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront", "locale": long}),
         "invalid_request"),
        (client.get(f"/v1/models/{long}"), "not_found"),
    ]:
        error = assert_error(response, response.status_code, code)
        assert "xxx...xxx" in error["message"] and len(response.content) < 600, error


def test_openapi_declares_error_shape(client):
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/scan"]["post"]["responses"]
    for status in ("400", "413", "415", "422", "429", "502", "503", "504"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    body = spec["paths"]["/v1/scan"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_probes(client, fake_engine):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    # uptime monitors and some load balancers probe with HEAD
    assert client.head("/health").status_code == 200 and client.head("/ready").status_code == 200


def test_ready_is_503_when_engine_is_gone():
    app = create_app(Settings(upstream_url="http://127.0.0.1:9"))  # nothing listens on port 9
    with TestClient(app) as c:
        assert_error(c.get("/ready"), 503, "upstream_unavailable")
        assert c.head("/ready").status_code == 503
        r = c.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "product_scan"})
        assert_error(r, 503, "upstream_unavailable")


def test_bodies_held_at_once_are_bounded_and_released(settings):
    # Each request may carry 300 KB, all of them together 400 KB.
    capped = settings.model_copy(update={"max_request_bytes": 300_000, "max_buffered_bytes": 400_000})
    padded = json.dumps({"task": "storefront"}).encode() + b" " * 200_000  # no images: a quick 400
    with serve_in_thread(create_app(capped)) as url, httpx.Client(base_url=url, timeout=10) as http:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            # A slow shop uplink: 250 KB of a 300 KB photo has arrived, the rest is on its way.
            slow.sendall(b"POST /v1/scan HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 300000\r\n\r\n" + b" " * 250_000)
            deadline = time.monotonic() + 10
            while (r := http.post("/v1/scan", content=padded, headers={"content-type": "application/json"})).status_code != 429:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.05)
            assert assert_error(r, 429, "overloaded") and r.headers["retry-after"] == "1"
            assert "bytes of request bodies" in r.json()["error"]["message"]
            # Without a declared length the cap is met mid-body: 429, and the rest is not read.
            with socket.create_connection((host, int(port))) as chunked:
                chunk = b" " * 200_000
                chunked.sendall(b"POST /v1/scan HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                chunked.settimeout(10)
                answer = chunked.recv(65536)
            assert answer.startswith(b"HTTP/1.1 429") and b"connection: close" in answer.lower()
        # The slow upload gave up: what it held is free again.
        deadline = time.monotonic() + 10
        while (r := http.post("/v1/scan", content=padded, headers={"content-type": "application/json"})).status_code == 429:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert_error(r, 400, "invalid_request")


def test_multipart_photos_over_a_mebibyte_stay_in_memory(client, fake_engine, monkeypatch):
    """Starlette spools file parts over 1 MiB to disk through its thread pool (5x the CPU
    per phone photo); the gateway keeps them in memory, capped by its body limits."""
    from starlette import formparsers

    rolled = []

    class Spool(formparsers.SpooledTemporaryFile):  # type: ignore[misc, name-defined]
        def rollover(self):
            rolled.append(self)
            super().rollover()

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", Spool)
    big = shelf_jpeg(3000, 2250, seed=11, quality=97)
    assert 1024 * 1024 < len(big) <= 2 * 1024 * 1024  # over Starlette's spool, under the image cap
    fake_engine.answer = lambda _: completion(VALID_PRODUCTS)
    r = client.post("/v1/scan", files={"image": ("shelf.jpg", big, "image/jpeg")}, data={"task": "product_scan"})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["bytes"] == len(big) and not rolled


def test_malformed_multipart_body_is_a_clear_400(client):
    r = client.post("/v1/scan", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"})
    error = assert_error(r, 400, "invalid_request")
    assert "multipart" in error["message"] and "boundary" in error["message"].lower()

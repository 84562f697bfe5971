import base64
import json
import logging
import time

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from scanner_gateway.app import create_app
from scanner_gateway.config import Settings
from scanner_gateway.errors import ServerErrorThrottle
from tests.api.test_scan_api import assert_error
from tests.fake_engine import FAKE_MODEL, FakeEngine, FakeReply, streamed
from tests.helpers import shelf_jpeg

PHOTO_URL = "data:image/jpeg;base64," + base64.b64encode(shelf_jpeg(640, 480)).decode()


def test_models_lists_engine_models_and_scan_tasks(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == FAKE_MODEL
    assert {"scan/product_scan", "scan/kitchen_compliance"} <= set(ids) and len(ids) == 6
    # OpenAI's Model object has all four; strictly typed clients expect each of them.
    for card in client.get("/v1/models").json()["data"]:
        assert isinstance(card["created"], int) and card["object"] == "model" and card["owned_by"]


def test_models_can_be_retrieved_one_by_one(client):
    card = client.get("/v1/models/scan/price_tags").json()
    created = card.pop("created")
    assert card == {"id": "scan/price_tags", "object": "model", "owned_by": "scanner-gateway"}
    assert abs(created - time.time()) < 600  # the tasks' load time: a Unix time, as OpenAI's Model has
    assert client.get(f"/v1/models/{FAKE_MODEL}").json()["id"] == FAKE_MODEL
    assert_error(client.get("/v1/models/scan/nope"), 404, "not_found")


def test_passthrough_forwards_the_body_byte_for_byte(settings, fake_engine):
    fake_engine.answer = lambda _: streamed(200, b'{"id": "x",', b' "object": "chat.completion"}', **{"x-engine": "1"})
    body = (b'{"model": "m",  "messages": [{"role": "user", "content": "hi"}], '
            b'"structured_outputs": {"json": {"type": "object"}}, "priority": -3, "mm_processor_kwargs": {"a": 1}}')
    update = {"upstream_api_key": "engine-secret", "engine_priorities": None}  # nothing added
    with TestClient(create_app(settings.model_copy(update=update))) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["id"] == "x" and r.headers["x-engine"] == "1"
    sent = fake_engine.received[-1]
    assert sent.path == "/v1/chat/completions" and sent.body == body
    assert sent.headers["authorization"] == "Bearer engine-secret"


@pytest.mark.parametrize(("path", "body", "kind"), [
    # What `vllm bench serve` and other load tools send by default.
    ("/v1/completions", {"model": "m", "prompt": "scan/product_scan is only a chat model", "max_tokens": 4},
     "text_completion"),
    # The newer OpenAI SDKs' client.responses.create.
    ("/v1/responses", {"model": "m", "input": "hello", "max_output_tokens": 4}, "response"),
    # Names a scan model only in its text: through the FastAPI route, still relayed to /v1/responses.
    ("/v1/responses", {"model": "m", "input": "what does scan/price_tags do?"}, "response"),
])
def test_completions_and_responses_are_relayed_too(client, fake_engine, path, body, kind):
    fake_engine.answer = lambda _: FakeReply.json(200, {"id": "x-1", "object": kind})
    r = client.post(path, json=body, headers={"X-Priority": "interactive"})
    assert r.status_code == 200 and r.json()["object"] == kind
    sent = fake_engine.received[-1]
    assert sent.path == path and json.loads(sent.body) == {**body, "priority": 0}
    assert client.get("/metrics").text.count(f'route="{path}"') >= 1


@pytest.mark.parametrize(("request_body", "header", "engine_priority"), [
    ({"model": "m", "messages": []}, None, 10),  # relayed chat defaults to batch
    ({"model": "m", "messages": []}, "interactive", 0),
    ({"model": "m", "messages": [], "priority": -3}, "interactive", -3),  # the client's own wins
])
def test_priority_class_reaches_the_engine(client, fake_engine, request_body, header, engine_priority):
    fake_engine.answer = lambda _: FakeReply.json(200, {"id": "x"})
    headers = {"X-Priority": header} if header else {}
    assert client.post("/v1/chat/completions", json=request_body, headers=headers).status_code == 200
    assert json.loads(fake_engine.received[-1].body)["priority"] == engine_priority


def test_bad_priority_header_is_400(client):
    r = client.post("/v1/chat/completions", json={"model": "m"}, headers={"X-Priority": "urgent"})
    assert assert_error(r, 400, "invalid_request")["param"] == "X-Priority"


def test_passthrough_relays_sse_chunks_as_they_come(client, fake_engine):
    events = [b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', b"data: [DONE]\n\n"]
    fake_engine.answer = lambda _: streamed(200, *events, content_type="text/event-stream")
    with client.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True, "messages": []}) as r:
        assert r.headers["content-type"] == "text/event-stream" and r.headers["x-accel-buffering"] == "no"
        assert b"".join(r.iter_raw()) == b"".join(events)


def test_engine_errors_pass_through_with_their_status(client, fake_engine):
    err = {"error": {"message": "max_tokens too large", "type": "BadRequestError", "param": None, "code": 400}}
    fake_engine.answer = lambda _: FakeReply.json(400, err)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 400 and r.json() == err


@pytest.mark.parametrize(
    ("reply", "status", "code", "message"),
    [
        # FastAPI's own errors inside vLLM (a body nested too deep for its JSON parser)
        (FakeReply.json(400, {"detail": "There was an error parsing the body"}), 400, "invalid_request",
         "There was an error parsing the body"),
        (FakeReply(404, (b"Not Found",), {"content-type": "text/plain"}), 404, "not_found", "Not Found"),
        (FakeReply(413, ()), 413, "payload_too_large", "HTTP 413"),
    ],
)
def test_engine_rejections_in_other_shapes_come_back_in_ours(client, fake_engine, reply, status, code, message):
    fake_engine.answer = lambda _: reply
    err = assert_error(client.post("/v1/chat/completions", json={"model": "m", "messages": []}), status, code)
    assert err["message"] == message


def test_engine_refusing_the_gateways_key_is_a_502_not_the_clients_401(client, fake_engine, caplog, unthrottled):
    fake_engine.reply = lambda path, raw: FakeReply.json(401, {"error": "Unauthorized"})  # vLLM's own words
    for r in (client.post("/v1/chat/completions", json={"model": "m", "messages": []}), client.get("/v1/models")):
        err = assert_error(r, 502, "engine_auth_failed")
        assert "SCANNER_UPSTREAM_API_KEY" in err["message"]
    assert any("engine_auth_failed" in r.getMessage() for r in caplog.records)


@pytest.fixture
def unthrottled(monkeypatch):
    """Every "answered 5xx" line logged, whatever earlier tests logged in the last second."""
    errors_log = logging.getLogger("scanner_gateway.errors")
    throttle = next(f for f in errors_log.filters if isinstance(f, ServerErrorThrottle))
    monkeypatch.setattr(throttle, "interval_s", 0.0)


def test_engine_faults_are_502_in_our_shape(client, fake_engine, caplog, unthrottled):
    # vLLM answers 500 when it cannot fetch an image URL: a fault behind the gateway, not in it.
    err = {"error": {"message": "Cannot connect to host example.com:80", "type": "InternalServerError",
                     "param": None, "code": 500}}
    fake_engine.answer = lambda _: FakeReply.json(500, err)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert_error(r, 502, "engine_error")
    assert "Cannot connect to host example.com:80" in r.json()["error"]["message"]
    chats = [got for got in fake_engine.received if got.path == "/v1/chat/completions"]
    assert len(chats) == 1  # a 500 may be the request's own doing: not retried
    logged = [r.getMessage() for r in caplog.records if r.name == "scanner_gateway.errors"]
    assert any(m.startswith("answered 502 engine_error") and "example.com" in m for m in logged)


def test_engine_down_is_503_in_our_shape(caplog, unthrottled):
    with TestClient(create_app(Settings(upstream_url="http://127.0.0.1:9"))) as c:  # nothing on port 9
        assert_error(c.post("/v1/chat/completions", json={"model": "m", "messages": []}), 503, "upstream_unavailable")
        assert_error(c.get("/v1/models"), 503, "upstream_unavailable")
    answered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered 503")]
    assert len(answered) == 2  # every 5xx is logged with its cause (relay and routes alike)


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"messages": []}', b'{"model": "scan/', b'["scan/x"]'])
def test_bodies_that_are_not_scan_requests_are_the_engines_to_judge(settings, fake_engine, body):
    # vLLM validates its own requests; the gateway relays its verdict untouched.
    verdict = {"error": {"message": "bad request", "type": "BadRequestError", "param": None, "code": 400}}
    fake_engine.reply = lambda path, raw: FakeReply.json(400, verdict)  # the body may not even parse
    with TestClient(create_app(settings.model_copy(update={"engine_priorities": None}))) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == verdict
    assert fake_engine.received[-1].body == body


def test_scan_task_as_model(client, fake_engine: FakeEngine):
    r = client.post("/v1/chat/completions", json={
        "model": "scan/storefront",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}},
                                                  {"type": "text", "text": "check"}]}],
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "scan/storefront"
    choice = body["choices"][0]
    # Required (nullable) members of OpenAI's schema, as vLLM's own answers have them.
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    result = json.loads(choice["message"]["content"])
    assert {"shop_name", "status", "issue_count"} <= set(result)
    assert body["scan"]["images"][0]["width"] == 640
    assert fake_engine.payloads[0]["response_format"]["json_schema"]["name"] == "storefront"


def test_scan_task_as_model_streams_the_result(client):
    r = client.post("/v1/chat/completions", json={
        "model": "scan/shelf_audit", "stream": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}}]}],
    })
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert "fullness_pct" in json.loads(content)
    assert all(json.loads(e)["choices"][0]["logprobs"] is None for e in events[:-1])
    assert all("usage" not in json.loads(e) for e in events[:-1])  # not asked for


def test_scan_model_stream_ends_with_usage_when_asked(client):
    r = client.post("/v1/chat/completions", json={
        "model": "scan/shelf_audit", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}}]}],
    })
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0
    assert all(e["choices"] for e in events[:-1])


def test_scan_model_errors(client):
    no_image = {"model": "scan/storefront", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=no_image), 400, "invalid_request")
    unknown = {"model": "scan/nope", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PHOTO_URL}}]}]}
    assert_error(client.post("/v1/chat/completions", json=unknown), 404, "unknown_task")
    assert_error(client.post("/v1/chat/completions", json={**no_image, "model": "scan/nope"}), 404, "unknown_task")


def test_scan_model_refuses_n_above_one(client, fake_engine):
    r = client.post("/v1/chat/completions", json={"model": "scan/storefront", "n": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}}]}]})
    assert assert_error(r, 400, "invalid_request")["param"] == "n"
    assert fake_engine.payloads == []


RESPONSES_SCAN = {"model": "scan/storefront", "input": [{"role": "user", "content": [
    {"type": "input_text", "text": "check"}, {"type": "input_image", "image_url": PHOTO_URL}]}]}


def test_scan_task_as_model_on_the_responses_api(client, fake_engine: FakeEngine):
    r = client.post("/v1/responses", json=RESPONSES_SCAN)
    assert r.status_code == 200, r.text
    response = openai.types.responses.Response.model_validate(r.json())  # the SDK's own model, strictly
    assert response.status == "completed" and response.model == "scan/storefront"
    assert {"shop_name", "status", "issue_count"} <= set(json.loads(response.output_text))
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens > 0
    assert r.json()["scan"]["images"][0]["width"] == 640
    assert fake_engine.payloads[0]["response_format"]["json_schema"]["name"] == "storefront"
    assert "/v1/responses" not in {got.path for got in fake_engine.received}  # the scan asked for chat


def test_responses_scan_model_takes_chat_style_image_objects_too(client):
    parts = [{"type": "input_image", "image_url": {"url": PHOTO_URL}}]
    r = client.post("/v1/responses", json={**RESPONSES_SCAN, "input": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text


def test_scan_model_streams_the_responses_api_events(client):
    r = client.post("/v1/responses", json={**RESPONSES_SCAN, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(b.split("\n")[1].removeprefix("data: ")))
              for b in blocks]
    assert names == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert names[0] == "response.created" and names[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert json.loads(text) == json.loads(events[-1].response.output_text)


@pytest.mark.parametrize(("request_input", "status", "code"), [
    ("check this shop", 400, "invalid_request"),  # text only: nothing to scan
    ([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}], 400, "invalid_request"),
    ({"role": "user"}, 400, "invalid_request"),
])
def test_responses_scan_model_errors(client, fake_engine, request_input, status, code):
    assert assert_error(client.post("/v1/responses", json={**RESPONSES_SCAN, "input": request_input}),
                        status, code)["param"] == "input"
    assert_error(client.post("/v1/responses", json={**RESPONSES_SCAN, "model": "scan/nope"}), 404, "unknown_task")
    assert fake_engine.payloads == []


@pytest.fixture
def auth_client(settings, fake_engine, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops team\nfile-key\n")
    app = create_app(settings.model_copy(update={"api_keys": "k1, k2", "api_keys_file": keys_file}))
    with TestClient(app) as c:
        yield c


def test_auth_protects_every_api_route_but_probes_page_and_docs(auth_client):
    for path in ["/health", "/ready", "/metrics", "/", "/docs", "/openapi.json"]:
        assert auth_client.get(path).status_code == 200, path
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/scan/price_tags"), ("GET", "/v1/tasks"),
                         ("POST", "/v1/scan"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
                         ("GET", "/docs/../v1/tasks"), ("GET", "/nope")]:
        r = auth_client.request(method, path)
        err = assert_error(r, 401, "invalid_api_key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_metrics_can_need_a_key_too(settings, fake_engine):
    keyed = settings.model_copy(update={"api_keys": "store-key", "metrics_need_key": True})
    with TestClient(create_app(keyed)) as c:
        assert_error(c.get("/metrics"), 401, "invalid_api_key")
        scraped = c.get("/metrics", headers={"Authorization": "Bearer store-key"})
        assert scraped.status_code == 200 and "scanner_requests_total" in scraped.text
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # probes stay open


def test_openapi_declares_the_bearer_key_when_keys_are_on(auth_client, client):
    spec = auth_client.get("/openapi.json").json()  # open: the docs page loads it before "Authorize"
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key"}
    assert spec["paths"]["/v1/scan"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


@pytest.mark.parametrize("key", ["k1", "k2", "file-key"])
def test_auth_accepts_every_configured_key(auth_client, key):
    assert auth_client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize("header", ["Bearer k3", "Bearer ", "Basic k1", "k1", "Bearer k1x", "Bearer # ops team"])
def test_auth_rejects_bad_keys_without_echoing_them(auth_client, header):
    r = auth_client.get("/v1/models", headers={"Authorization": header})
    err = assert_error(r, 401, "invalid_api_key")
    assert "k1" not in err["message"] and "k3" not in err["message"]


def test_auth_off_by_default(client):
    assert client.get("/v1/models").status_code == 200


def test_settings_parse_keys():
    assert Settings(api_keys=" a, ,b ").client_keys() == ["a", "b"]

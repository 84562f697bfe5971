"""Admission control, priorities and idempotency, against a FAKE ENGINE (slow on purpose)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from tests.api.test_scan_api import PHOTO, assert_error
from tests.fake_engine import FakeReply, completion

PHOTO_URL = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()


def slow(delay_s: float):
    def answer(payload):
        if "response_format" in payload:  # a scan: answer with a schema-valid sample
            from scanner_gateway.scan.schema import sample_instance
            reply = completion(json.dumps(sample_instance(payload["response_format"]["json_schema"]["schema"])))
        else:
            reply = completion(payload["messages"][0]["content"])
        reply.delay_s = delay_s
        return reply
    return answer


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def test_overload_gives_only_200_and_fast_429_with_retry_after(settings, fake_engine):
    # A fake engine: its answers take 5 s, so a 429 that waited for one would come after a 200.
    fake_engine.answer = slow(5.0)
    tight = settings.model_copy(update={"max_in_flight_per_replica": 2, "queue_limit": 2})
    answered: list[int] = []  # statuses in the order they came back
    with TestClient(create_app(tight)) as c, ThreadPoolExecutor(24) as pool:
        def one(i):
            r = c.post("/v1/chat/completions", json=chat(str(i)))
            answered.append(r.status_code)
            return r

        results = list(pool.map(one, range(24)))
    statuses = Counter(r.status_code for r in results)
    assert set(statuses) == {200, 429} and statuses[200] >= 4, statuses
    for r in results:
        if r.status_code == 429:
            assert_error(r, 429, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
    # Refused at once: every 429 was back before the engine's first answer.
    assert answered.index(200) == statuses[429], answered


def test_scans_are_admitted_too(settings, fake_engine):
    fake_engine.answer = slow(0.3)
    tight = settings.model_copy(update={"max_in_flight_per_replica": 1, "queue_limit": 0})
    with TestClient(create_app(tight)) as c, ThreadPoolExecutor(4) as pool:
        statuses = Counter(pool.map(
            lambda _: c.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"}).status_code,
            range(4)))
    assert statuses[200] >= 1 and statuses[429] >= 1 and set(statuses) == {200, 429}


def test_interactive_overtakes_queued_batch(settings, fake_engine):
    # The fake engine records the order requests reached it, with the priority each carried.
    fake_engine.answer = slow(0.5)
    one_at_a_time = settings.model_copy(update={"max_in_flight_per_replica": 1})
    with TestClient(create_app(one_at_a_time)) as c:
        admission = c.app.state.gateway.admission
        threads = []

        def send(text, klass, then):
            t = threading.Thread(target=c.post, args=("/v1/chat/completions",),
                                 kwargs={"json": chat(text), "headers": {"X-Priority": klass}})
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 30
            while not then():  # a fixed arrival order: each is in place before the next is sent
                assert time.monotonic() < deadline, f"{text} never got in place"
                time.sleep(0.01)

        c.post("/v1/chat/completions", json=chat("warm-up"))  # a cold gateway queues one round at most
        fake_engine.received.clear()
        send("first", "batch", lambda: fake_engine.received)  # runs at once
        for i in range(3):
            send(f"batch-{i}", "batch", lambda i=i: admission.queued("batch") == i + 1)  # queue behind it
        send("urgent", "interactive", lambda: admission.queued("interactive") == 1)
        for t in threads:
            t.join()
    order = [json.loads(r.body)["messages"][0]["content"] for r in fake_engine.received if r.path.startswith("/v1/chat")]
    assert order == ["first", "urgent", "batch-0", "batch-1", "batch-2"]
    assert [json.loads(r.body)["priority"] for r in fake_engine.received if r.path.startswith("/v1/chat")][:2] == [10, 0]


def test_scan_priority_field_overrides_the_header(client, fake_engine):
    fake_engine.answer = slow(0)
    batch_header = {"X-Priority": "batch"}
    client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"}, headers=batch_header)
    client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront", "priority": "interactive"},
                headers=batch_header)
    photo = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    client.post("/v1/scan", json={"task": "storefront", "images": [photo], "priority": "batch"})
    assert [p["priority"] for p in fake_engine.payloads] == [10, 0, 10]
    bad = client.post("/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront", "priority": "now"})
    assert_error(bad, 400, "invalid_request")
    assert bad.json()["error"]["param"] == "priority"


def test_repeated_idempotency_key_scans_once(client, fake_engine):
    fake_engine.answer = slow(0.3)
    form = {"files": {"image": ("a.jpg", PHOTO)}, "data": {"task": "storefront"}}
    with ThreadPoolExecutor(3) as pool:  # two arrive while the first runs: they join it
        results = list(pool.map(lambda _: client.post("/v1/scan", headers={"Idempotency-Key": "k-1"}, **form), range(3)))
    later = client.post("/v1/scan", headers={"Idempotency-Key": "k-1"}, **form)  # after it finished
    ids = {r.json()["id"] for r in [*results, later]}
    assert len(ids) == 1 and all(r.status_code == 200 for r in [*results, later])
    assert len(fake_engine.payloads) == 1

    other_photo = {"files": {"image": ("b.jpg", PHOTO[:-10] + b"\xff\xd9")}, "data": {"task": "storefront"}}
    reused = client.post("/v1/scan", headers={"Idempotency-Key": "k-1"}, **other_photo)
    assert_error(reused, 422, "idempotency_key_reused")
    assert client.post("/v1/scan", headers={"Idempotency-Key": "k-2"}, **form).json()["id"] not in ids
    assert_error(client.post("/v1/scan", headers={"Idempotency-Key": "x" * 300}, **form), 400, "invalid_request")


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "scan/storefront", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PHOTO_URL}}]}]}),
    ("/v1/responses", {"model": "scan/storefront", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": PHOTO_URL}]}]}),
])
def test_scan_models_honour_idempotency_keys_too(client, fake_engine, path, body):
    # An OpenAI SDK retrying over a flaky store network (extra_headers={"Idempotency-Key": ...}).
    first, again = (client.post(path, json=body, headers={"Idempotency-Key": "sdk-1"}) for _ in range(2))
    assert first.status_code == again.status_code == 200
    assert first.json()["scan"]["id"] == again.json()["scan"]["id"] and len(fake_engine.payloads) == 1
    assert client.post(path, json=body, headers={"Idempotency-Key": "sdk-2"}).json()["scan"]["id"] != \
        first.json()["scan"]["id"]


def test_failed_idempotent_scan_is_not_kept(client, fake_engine):
    fake_engine.answer = lambda _: FakeReply(500, (b"boom",))
    form = {"files": {"image": ("a.jpg", PHOTO)}, "data": {"task": "storefront"}}
    assert client.post("/v1/scan", headers={"Idempotency-Key": "k"}, **form).status_code == 502
    fake_engine.answer = slow(0)
    assert client.post("/v1/scan", headers={"Idempotency-Key": "k"}, **form).status_code == 200


def test_one_key_over_its_limit_gets_429_while_other_keys_are_served(settings, fake_engine):
    fake_engine.answer = slow(0.8)
    update = {"api_keys": "store-a,store-b", "max_in_flight_per_key": 2}
    store_a, store_b = ({"Authorization": f"Bearer {k}"} for k in ("store-a", "store-b"))
    form = {"files": {"image": ("a.jpg", PHOTO)}, "data": {"task": "storefront"}}
    with TestClient(create_app(settings.model_copy(update=update))) as c, ThreadPoolExecutor(6) as pool:
        runaway = [pool.submit(c.post, "/v1/chat/completions", json=chat(str(i)), headers=store_a) for i in range(2)]
        time.sleep(0.3)  # store A has its two open
        refused = [c.post("/v1/scan", headers=store_a, **form), c.post("/v1/chat/completions", json=chat("x"),
                                                                        headers=store_a)]
        other = pool.submit(c.post, "/v1/scan", headers=store_b, **form)
        assert [r.result().status_code for r in runaway] == [200, 200] and other.result().status_code == 200
        assert c.post("/v1/chat/completions", json=chat("later"), headers=store_a).status_code == 200  # freed
        assert c.get("/v1/tasks", headers=store_a).status_code == 200  # cheap routes are not counted
        metrics = c.get("/metrics").text
    for r in refused:
        assert_error(r, 429, "key_over_limit")
        assert r.headers["retry-after"] == "1"
    assert "scanner_client_limit_rejections_total 2.0" in metrics


def test_overloaded_gateway_refuses_a_scan_before_reading_its_photos(settings, fake_engine):
    """The 429 comes before the body is read: a burst of phone photos is refused without
    parsing megabytes of uploads first."""
    from tests.api.test_observability import value

    fake_engine.answer = slow(1.0)
    one_slot = settings.model_copy(update={"max_in_flight_per_replica": 1, "queue_limit": 0})
    app = create_app(one_slot)
    body_reads: Counter = Counter()

    async def counting_reads(scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request" and scope["type"] == "http":
                body_reads[dict(scope["headers"]).get(b"x-test", b"").decode()] += 1
            return message
        await app(scope, counted, send)

    with TestClient(counting_reads) as c:
        first = threading.Thread(target=c.post, args=("/v1/scan",), kwargs={
            "files": {"image": ("a.jpg", PHOTO)}, "data": {"task": "storefront"}, "headers": {"x-test": "first"}})
        first.start()
        deadline = time.monotonic() + 30
        # Once the engine has the first scan (not just a probe), it holds the one slot.
        while (not any(r.path.endswith("/chat/completions") for r in fake_engine.received)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        refused = c.post("/v1/scan", files={"image": ("b.jpg", PHOTO)}, data={"task": "storefront"},
                         headers={"x-test": "second", "X-Priority": "batch"})
        first.join()
        metrics = c.get("/metrics").text
    assert_error(refused, 429, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert body_reads["first"] >= 1 and body_reads["second"] == 0
    assert value(metrics, "scanner_scans_total", task="(unread)", outcome="overloaded") == 1


def test_the_decode_queue_holds_what_the_admission_lets_in(settings, fake_engine):
    """Sized from the in-flight cap, so a scan admission let in is never refused by the
    decode queue (a fixed 64 refused 888 admitted scans at c=128 on an H200 box)."""
    from scanner_gateway.config import MAX_AUTO_IMAGE_WORKERS, usable_cpus

    wide = settings.model_copy(update={"max_in_flight_per_replica": 128, "image_workers": 0, "image_queue_limit": 0})
    with TestClient(create_app(wide)) as c:
        service = c.app.state.gateway.scan_service
        registry = c.app.state.gateway.registry
        assert service.admission.max_in_flight == 128
        assert service.normalizer._queue_limit == 128 * registry.most_images()
        assert service.normalizer._pool._max_workers == min(usable_cpus(), MAX_AUTO_IMAGE_WORKERS)


def test_with_no_cap_an_engine_that_queues_holds_requests_in_the_gateway(settings, fake_engine):
    # Fake engine: it reports a queue of its own on cue (vllm:num_requests_waiting), which a
    # real engine does only under a load the test could not time.
    fake_engine.answer = slow(0.0)
    fake_engine.running, fake_engine.waiting = 8, 10  # all it runs at once, and a queue
    quick_probes = settings.model_copy(update={"probe_interval_s": 0.1, "queue_limit": 1})
    assert quick_probes.max_in_flight_per_replica == 0  # the default: no fixed cap
    with TestClient(create_app(quick_probes)) as c, ThreadPoolExecutor(2) as pool:
        admission = c.app.state.gateway.admission
        wait_for(lambda: c.app.state.gateway.pool.saturated(), "the gateway read the engine's queue")
        held = pool.submit(c.post, "/v1/chat/completions", json=chat("held"))
        wait_for(lambda: admission.queued() == 1, "the request waits in the gateway")
        refused = c.post("/v1/chat/completions", json=chat("refused"))  # the gateway's queue is full
        assert_error(refused, 429, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
        assert not [r for r in fake_engine.received if r.path == "/v1/chat/completions"]
        fake_engine.running = fake_engine.waiting = 0  # the engine caught up: the next reading lets it in
        assert held.result(timeout=30).status_code == 200
    sent = [json.loads(r.body)["messages"][0]["content"] for r in fake_engine.received if r.path == "/v1/chat/completions"]
    assert sent == ["held"]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)

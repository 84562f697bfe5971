"""The openai SDK against the gateway in front of the real engine: as it would use vLLM."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import openai
import pytest

from scanner_gateway.engine.launcher import DEV_SERVED_NAME
from scanner_gateway.scan.results import ProductScan
from tests.e2e.engine_watch import HELD_MAX_TOKENS
from tests.helpers import shelf_jpeg

pytestmark = pytest.mark.e2e
PHOTO_URL = "data:image/jpeg;base64," + base64.b64encode(shelf_jpeg(800, 600, seed=21)).decode()
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["count"],
          "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 99}}}


def user(text: str, image: bool = True) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": PHOTO_URL}}] if image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture
def sdk(gateway_url):
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)


def test_models(sdk):
    ids = [m.id for m in sdk.models.list()]
    assert DEV_SERVED_NAME in ids and "scan/product_scan" in ids
    assert sdk.models.retrieve("scan/price_tags").owned_by == "scanner-gateway"
    assert sdk.models.retrieve(DEV_SERVED_NAME).id == DEV_SERVED_NAME
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("scan/nope")


def test_sync_passthrough_with_vllm_fields(sdk):
    r = sdk.chat.completions.create(
        model=DEV_SERVED_NAME, messages=user("count the products"), max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"json": SCHEMA}, "priority": 0},
    )
    assert r.model == DEV_SERVED_NAME
    assert 0 <= json.loads(r.choices[0].message.content)["count"] <= 99  # vLLM honoured the vLLM-only field


def test_text_completions_stream_through(sdk):
    # The legacy completions API, as `vllm bench serve` and other load tools use it.
    chunks = list(sdk.completions.create(model=DEV_SERVED_NAME, prompt="Aisle 4:", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert sum(1 for c in chunks if c.choices) >= 2  # relayed as it streamed, not as one body
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 6


def test_responses_api_passes_through(sdk):
    # The newer SDKs' Responses API, which vLLM serves too: image input included.
    photo = "data:image/jpeg;base64," + base64.b64encode(shelf_jpeg(320, 240)).decode()
    r = sdk.responses.create(model=DEV_SERVED_NAME, max_output_tokens=8, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_text", "text": "describe"},
                                    {"type": "input_image", "image_url": photo}]}])
    assert r.model == DEV_SERVED_NAME and r.usage.output_tokens >= 1 and r.output


def test_async_concurrent_passthrough(gateway_url):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*(
            client.chat.completions.create(model=DEV_SERVED_NAME, messages=user(f"hi {i}", image=False),
                                           max_tokens=8)
            for i in range(8)))
        await client.close()
        return rs

    assert all(r.usage.completion_tokens > 0 for r in asyncio.run(main()))


def test_streaming_passthrough_arrives_in_chunks(sdk):
    stream = sdk.chat.completions.create(model=DEV_SERVED_NAME, messages=user("describe"), max_tokens=32,
                                         stream=True)
    chunks = [c for c in stream]
    assert len(chunks) > 5
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") or chunks[-2].choices[0].finish_reason


def test_engine_error_in_openai_shape(sdk):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=DEV_SERVED_NAME, messages=user("x", image=False), max_tokens=10**7)
    assert exc.value.status_code == 400 and exc.value.body


def test_scan_task_as_model(sdk):
    r = sdk.chat.completions.create(model="scan/product_scan", messages=user("scan"))
    assert r.model == "scan/product_scan" and r.choices[0].finish_reason == "stop"
    result = ProductScan.model_validate(json.loads(r.choices[0].message.content))
    assert result.model_dump()["total_products"] == len(result.products)
    assert r.model_extra["scan"]["images"][0]["width"] == 800


def test_scan_task_as_model_streaming(sdk):
    stream = sdk.chat.completions.create(model="scan/storefront", messages=user("check"), stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(content)["status"] in ("open", "closed", "unknown")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_scan_task_as_model_on_the_responses_api(sdk):
    parts = [{"type": "input_text", "text": "scan"}, {"type": "input_image", "image_url": PHOTO_URL}]
    r = sdk.responses.create(model="scan/product_scan", input=[{"role": "user", "content": parts}])
    assert r.model == "scan/product_scan" and r.status == "completed"
    result = ProductScan.model_validate(json.loads(r.output_text))
    assert result.model_dump()["total_products"] == len(result.products)
    # The SDK's streaming helper assembles the same kind of answer from the events.
    with sdk.responses.stream(model="scan/storefront", input=[{"role": "user", "content": parts}]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert json.loads("".join(deltas)) == json.loads(final.output_text)
    assert final.usage.output_tokens > 0


def generated_tokens(engine_url: str) -> float:
    text = httpx.get(f"{engine_url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_client_disconnect_mid_stream_frees_the_engine(gateway_url, engine):
    body = {"model": DEV_SERVED_NAME, "messages": user("go on", image=False), "max_tokens": HELD_MAX_TOKENS,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{gateway_url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            for _ in range(20):
                next(chunks)
    # The client left after a few chunks of a generation that runs for minutes: the engine must stop
    # producing tokens (counter flat), not finish the request for nobody.
    time.sleep(1.0)
    before = generated_tokens(engine.base_url)
    time.sleep(2.0)
    assert generated_tokens(engine.base_url) - before < 50

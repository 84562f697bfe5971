"""The relay's media pre-check and policy: no body that could make the engine fetch a URL
(or carry a refused kind) passes unparsed, and a parsed body's URLs are all found."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner_gateway.errors import InvalidRequest, MediaKindRefused
from scanner_gateway.scan.image_urls import ImageFetcher
from scanner_gateway.upstream.relay_body import MAY_CARRY_MEDIA, NAMES_SCAN_MODEL, body_marks
from scanner_gateway.upstream.relay_media import RelayMedia


def may_carry_media(body: bytes) -> bool:
    return bool(body_marks(body) & MAY_CARRY_MEDIA)

DATA_URL = "data:image/jpeg;base64," + "A" * 4000


def chat(*parts: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}]}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def as_body(request: object, **dumps: object) -> bytes:
    return json.dumps(request, **dumps).encode()


def test_data_url_images_and_text_pass_unparsed():
    body = as_body(chat(image(DATA_URL)))
    assert not may_carry_media(body) and body_marks(body) == 0
    assert not may_carry_media(as_body({"model": "m", "messages": [{"role": "user", "content": "hello"}]}))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "HTTPS://a.example/x", "hTtP://x", "file:///etc/passwd", "https:x",
])
def test_any_url_spelling_is_caught(url):
    assert may_carry_media(as_body(chat(image(url))))


@pytest.mark.parametrize("body", [
    b'{"messages":[{"content":[{"image_url":{"url":"\\u0068ttp://127.0.0.1/"}}]}]}',  # escaped first letter
    b'{"messages":[{"content":[{"image_url":{"url":"h\\u0074tp://127.0.0.1/"}}]}]}',  # escaped later letter
    b'{"messages":[{"content":[{"\\u0076ideo_url":{"url":"data:video/mp4;base64,AA"}}]}]}',
    b'{"messages":[{"content":[{"image_url":{"url":"http:\\/\\/127.0.0.1\\/"}}]}]}',
])
def test_escapes_cannot_hide_a_url_or_a_kind(body):
    assert json.loads(body)  # valid JSON, as the engine would read it
    assert may_carry_media(body) and body_marks(body) & MAY_CARRY_MEDIA


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_utf16_and_utf32_json_is_always_parsed(encoding):
    body = json.dumps(chat(image("http://127.0.0.1/x"))).encode(encoding)
    assert json.loads(body)["messages"]  # Python's parser (and so vLLM's) reads it
    assert may_carry_media(body)


@pytest.mark.parametrize("part", [
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    {"video_url": {"url": "data:video/mp4;base64,AAAA"}},  # vLLM infers the type from the key
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
    {"type": "file", "file": {"file_data": "AAAA", "filename": "a.pdf"}},
    {"type": "input_file", "file_id": "file-1"},
    {"type": "image_embeds", "image_embeds": "AAAA"},
])
def test_refused_kinds_are_caught_and_refused(part):
    body = as_body(chat(part))
    assert may_carry_media(body)
    with pytest.raises(MediaKindRefused) as refused:
        run(policy().vetted(body))
    assert refused.value.param.startswith("messages[0].content[0]")
    run(policy(kinds={"image", "video", "audio", "file", "embeds"}).vetted(body))  # turned on: relayed


def test_the_scan_model_mark_is_kept():
    assert body_marks(b'{"model":"scan/price_tags"}') == NAMES_SCAN_MODEL
    assert body_marks(b'{"model":"scan/x","messages":[{"content":[{"image_url":"http://a/"}]}]}') == (
        NAMES_SCAN_MODEL | MAY_CARRY_MEDIA)


# Any JSON whose strings the engine could read as a URL: one such string somewhere in a
# random document, written with or without escapes.
_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
_json = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
_url = st.builds(lambda scheme, rest: scheme + rest,
                 st.sampled_from(["http", "HTTP", "Https", "file", "hTTp"]), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(doc=_json, url=_url, ascii_only=st.booleans(), where=st.integers(0, 3))
def test_no_url_anywhere_passes_unparsed(doc, url, ascii_only, where):
    placed = [url, {"u": url}, {url: 1}, [doc, url]][where]
    body = as_body({"doc": doc, "x": placed}, ensure_ascii=ascii_only)
    assert may_carry_media(body)


class _Fetcher(ImageFetcher):
    """The real policy and a real client with a transport answering every allowed host:
    a unit test of what gets fetched and how it is inlined, no socket."""

    def __init__(self, hosts: list[str]) -> None:
        self.hits: list[str] = []

        def answer(request: httpx.Request) -> httpx.Response:
            self.hits.append(str(request.url))
            return httpx.Response(200, content=b"\xff\xd8jpeg", headers={"content-type": "image/jpeg; q=1"})

        super().__init__(httpx.AsyncClient(transport=httpx.MockTransport(answer)), hosts,
                         max_bytes=1 << 20, timeout_s=5)


def policy(hosts: list[str] | None = None, kinds: set[str] | None = None, max_urls: int = 4) -> RelayMedia:
    return RelayMedia(_Fetcher(hosts or []), frozenset(kinds or {"image"}), max_urls=max_urls)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/x", "http://localhost/x", "http://[::1]/x", "http://[::ffff:127.0.0.1]/x",
    "http://2130706433/x", "http://images.example.com@127.0.0.1/x", "http://127.0.0.1#@images.example.com/x",
])
def test_hosts_off_the_list_are_refused_before_any_fetch(url):
    relay = policy(["images.example.com"])
    for request in (chat(image(url)), {"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": url}]}]}):
        with pytest.raises(InvalidRequest) as refused:
            run(relay.vetted(as_body(request)))
        assert "SCANNER_IMAGE_URL_HOSTS" in refused.value.message and "/x" not in refused.value.message
    assert relay.fetcher.hits == []


def test_allowed_urls_reach_the_engine_as_data_urls_only():
    relay = policy(["*.example.com"])
    request = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://a.example.com/shelf.jpg?sig=s3cr3t"},
        {"type": "input_text", "text": "http://not-a-media-field.example.com"}]}]}
    forwarded = json.loads(run(relay.vetted(as_body(request))))
    assert forwarded["input"][0]["content"][0]["image_url"].startswith("data:image/jpeg;base64,")
    assert forwarded["input"][0]["content"][1] == request["input"][0]["content"][1]  # text is text
    assert relay.fetcher.hits == ["https://a.example.com/shelf.jpg?sig=s3cr3t"]


def test_other_schemes_and_too_many_urls_are_refused():
    with pytest.raises(InvalidRequest, match="data URLs or http"):
        run(policy().vetted(as_body(chat(image("file:///etc/passwd")))))
    relay = policy(["a.example.com"], max_urls=2)
    with pytest.raises(InvalidRequest, match="at most 2 media URLs") as refused:
        run(relay.vetted(as_body(chat(*[image("http://a.example.com/x.jpg")] * 3))))
    assert refused.value.param == "messages[0].content[2].image_url" and relay.fetcher.hits == []


def test_a_body_that_is_not_json_is_a_400():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        run(policy().vetted(b'{"messages": "http://'))
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequest):
        run(policy().vetted(b'{"u":"http://x","d":' + deep + b"}"))

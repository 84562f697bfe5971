"""The media in a relayed OpenAI request, held to the scan path's URL policy.

vLLM fetches any http(s) URL in a content part it is handed, from inside the operator's
network. So the relay never hands it one: every URL-bearing part of a chat or Responses
request is checked against `SCANNER_IMAGE_URL_HOSTS` before the engine sees the request,
and an allowed URL is fetched here and forwarded as a data URL.

Why the gateway fetches, not the engine: one fetcher with one set of limits (hosts,
redirects re-checked at each hop, a byte cap while the body streams in, a timeout, a
bound on downloads at once) for scans and relayed requests alike; what the engine
receives is exactly what the gateway checked, with no second URL parser or DNS lookup
to disagree with ours; and vLLM's own `--allowed-media-domains` matches exact host names,
so it could not express `*.s3.amazonaws.com`. The engine is therefore started allowing
no media host at all (`engine/launcher.py`).

Media kinds the product does not serve (video, audio, files, raw embeddings) are refused
unless the operator lists them in `SCANNER_RELAY_MEDIA_KINDS`.

Most relayed bodies carry no URL, and parsing a 100 KB body costs more than the whole
relay: the relay's one pre-check pass (`relay_body.body_marks`) looks at the first bytes
of each JSON string with `opens_media_mark` and lets a body through unparsed when none
of them could start a URL or name a refused kind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scanner_gateway.concurrency import all_or_first_error
from scanner_gateway.errors import InvalidRequest, MediaKindRefused, echo
from scanner_gateway.scan.image_urls import ImageFetcher, is_image_url

MEDIA_KINDS = ("image", "video", "audio", "file", "embeds")
DEFAULT_MEDIA_KINDS = ("image",)
# Content-part keys vLLM reads media from, whatever the part's `type` says (it infers the
# type from these keys when `type` is missing).
_KEY_KINDS = {
    "image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio",
    "file": "file", "file_id": "file", "file_data": "file", "file_url": "file",
    "image_embeds": "embeds", "audio_embeds": "embeds", "video_embeds": "embeds",
    "prompt_embeds": "embeds", "image_pil": "embeds",
}
_TYPE_KINDS = {**_KEY_KINDS, "input_image": "image", "input_file": "file", "input_video": "video"}
# Keys whose value is a URL (a string, or `{"url": ...}`).
_URL_KEYS = ("image_url", "video_url", "audio_url", "file_url")
# Where content parts live: chat `messages`, Responses `input`.
_PART_ROOTS = ("messages", "input")
# A JSON string whose first characters are one of these may be a URL or a refused kind's
# name (URL schemes are case-insensitive; a backslash escape may hide either).
_MARKS = (b"http", b"file", b"video", b"audio", b"input_", b"image_e", b"image_p", b"prompt_e")
_MARK_LEN = max(map(len, _MARKS))
MEDIA_MARK_FIRST_BYTES = frozenset(b"hHfFvVaAiIpP\\")
_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
# Bodies larger than this are parsed and re-encoded off the event loop.
_OFF_LOOP_BYTES = 256 * 1024


def unusual_encoding(body: bytes) -> bool:
    """JSON in UTF-16/32, which Python's parser (vLLM's too) accepts: its letters sit
    between NUL bytes where no byte search sees them, so such a body is always parsed."""
    return bool(body[:2].count(0)) or body.startswith((b"\xfe\xff", b"\xff\xfe"))


def opens_media_mark(body: bytes, start: int) -> bool:
    """Whether the JSON string starting at `start` (just past its quote) may be a media
    URL or a refused kind's name: only its first decoded character can rule that out, and
    it is the first byte unless that is a backslash escape."""
    if start >= len(body) or body[start] not in MEDIA_MARK_FIRST_BYTES:
        return False
    head = body[start:start + _MARK_LEN]
    return b"\\" in head or head.lower().startswith(_MARKS)


@dataclass
class _UrlSlot:
    """Where a media URL sits in the parsed body, so a data URL can take its place."""

    holder: dict[str, Any]
    key: str
    url: str
    param: str


class RelayMedia:
    """Checks (and inlines) the media of relayed request bodies."""

    def __init__(self, fetcher: ImageFetcher, kinds: frozenset[str], max_urls: int) -> None:
        self.fetcher = fetcher
        self.kinds = kinds
        self.max_urls = max_urls

    async def vetted(self, body: bytes) -> bytes:
        """The body to forward in place of one marked MAY_CARRY_MEDIA: re-encoded after
        its media were checked, every URL replaced by a data URL of the bytes fetched here
        (re-encoded even with none, so the engine parses exactly what was checked). Raises
        4xx gateway errors (a refused host or kind, a failed fetch) or 429."""
        request = await _off_loop_if_large(_parse, body)
        slots = self._url_slots(request)
        if not slots:
            return await _off_loop_if_large(_encode, request, size=len(body))
        fetched = await all_or_first_error(self.fetcher.fetch_media(s.url, param=s.param) for s in slots)
        size = len(body) + sum(len(data) for data, _ in fetched)
        return await _off_loop_if_large(_inline, request, slots, fetched, size=size)

    def _url_slots(self, request: Any) -> list[_UrlSlot]:
        slots = []
        for part, param in _content_parts(request):
            for kind in _kinds_of(part):
                if kind not in self.kinds:
                    raise MediaKindRefused(
                        f"{kind} content is not relayed by this gateway (it serves images); its "
                        "operator can allow more kinds with SCANNER_RELAY_MEDIA_KINDS", param=param,
                    )
            for key in _URL_KEYS:
                found = _url_at(part, key)
                if found is None:
                    continue  # no URL: nothing to fetch; a malformed part the engine refuses
                holder, url_key = found
                url = holder[url_key]
                if url[:5].lower() == "data:":
                    continue  # the bytes themselves
                where = f"{param}.{key}"
                if not is_image_url(url):
                    raise InvalidRequest(
                        f"media URLs must be data URLs or http(s) URLs (got {echo(url.split(':', 1)[0])}:...)",
                        param=where,
                    )
                self.fetcher.allowed_url(url, where)  # every URL checked before any is fetched
                slots.append(_UrlSlot(holder, url_key, url, where))
        if len(slots) > self.max_urls:
            raise InvalidRequest(
                f"at most {self.max_urls} media URLs are fetched per request; got {len(slots)}",
                param=slots[self.max_urls].param,
            )
        return slots


def _content_parts(request: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every dict under `messages` and `input`, with its path: content parts at any depth
    (message content, tool outputs), and the messages themselves, which hold no media
    keys of their own. An explicit stack, so no nesting depth raises RecursionError."""
    if not isinstance(request, dict):
        return
    stack: list[tuple[Any, str]] = [(request.get(root), root) for root in reversed(_PART_ROOTS)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            yield node, path
            stack.extend((value, f"{path}.{key}") for key, value in node.items() if isinstance(value, (dict, list)))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in reversed(list(enumerate(node))))


def _kinds_of(part: dict[str, Any]) -> set[str]:
    kinds = {_KEY_KINDS[key] for key in part if key in _KEY_KINDS}
    part_type = part.get("type")
    if isinstance(part_type, str) and part_type in _TYPE_KINDS:
        kinds.add(_TYPE_KINDS[part_type])
    return kinds


def _url_at(part: dict[str, Any], key: str) -> tuple[dict[str, Any], str] | None:
    """Where `part[key]`'s URL string sits: in `part` itself (the Responses API's
    `image_url` string) or in the nested `{"url": ...}` of Chat Completions."""
    holder, value = part, part.get(key)
    if isinstance(value, dict):
        holder, key, value = value, "url", value.get("url")
    return (holder, key) if isinstance(value, str) else None


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def _encode(request: Any) -> bytes:
    try:
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None


def _inline(request: Any, slots: list[_UrlSlot], fetched: list[tuple[bytes, str]]) -> bytes:
    for slot, (data, content_type) in zip(slots, fetched):
        media_type = content_type.split(";", 1)[0].strip()
        if not _MEDIA_TYPE.fullmatch(media_type):
            media_type = "application/octet-stream"  # a data URL's header must stay a header
        slot.holder[slot.key] = f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
    return _encode(request)


async def _off_loop_if_large(function: Any, *args: Any, size: int | None = None) -> Any:
    """`function(*args)`, in a worker thread when the data is large (megabytes of JSON
    or base64 would stall every other request on the loop)."""
    if (size if size is not None else len(args[0])) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)

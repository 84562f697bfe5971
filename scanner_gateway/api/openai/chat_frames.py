"""Scan tasks as OpenAI models: `model: "scan/<task>"` on /v1/chat/completions.

The photos are the image parts of the user message(s); the answer is an ordinary
chat.completion whose assistant content is the validated result JSON (the full scan
envelope rides along in an extra `scan` field, which OpenAI SDKs keep).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from scanner_gateway.admission import PriorityClass
from scanner_gateway.errors import GatewayError, InvalidRequest
from scanner_gateway.scan.results import ScanResult
from scanner_gateway.scan.scan_models import (
    SCAN_MODEL_PREFIX,
    image_part_url,
    result_json,
    run_scan_model,
    scan_envelope,
    scan_model_name,
    user_parts,
)
from scanner_gateway.scan.service import ScanService


def images_from_messages(messages: Any) -> list[str]:
    """Image URLs (data URLs or base64) of every user message's image parts, in order."""
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list", param="messages")
    images: list[str] = []
    for part in user_parts(messages, "image_url"):
        url = image_part_url(part)
        if not isinstance(url, str) or not url:
            raise InvalidRequest("image_url parts need a url", param="messages")
        images.append(url)
    return images


async def scan_as_chat(
    service: ScanService,
    task: str,
    request: dict[str, Any],
    priority: PriorityClass,
    idempotency_key: str | None = None,
) -> ScanResult:
    if request.get("n") not in (None, 1):
        # One scan, one answer: n copies of it would only look like independent samples.
        raise InvalidRequest(f"model scan/{task} gives one answer per request; drop n", param="n")
    return await run_scan_model(
        service, task, request, lambda r: images_from_messages(r.get("messages")), priority,
        image_part="image_url", param="messages", idempotency_key=idempotency_key,
    )


def chat_completion(result: ScanResult) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.id}",
        "object": "chat.completion",
        "created": result.created,
        "model": scan_model_name(result),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result_json(result), "refusal": None},
            "logprobs": None,  # with `refusal`, required (nullable) in OpenAI's schema; vLLM sends both too
            "finish_reason": "stop",
        }],
        "usage": result.usage.model_dump(),
        "scan": scan_envelope(result),
    }


def wants_usage_chunk(request: dict[str, Any]) -> bool:
    """`stream_options: {"include_usage": true}`: a last chunk with the usage (OpenAI's rule)."""
    options = request.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class ChatChunkStream:
    """The chat.completion.chunk stream of one scan: the role chunk as soon as it opens
    (before the scan has a result, so its id is its own), then the whole result JSON as
    one content chunk, the finish chunk, [the usage chunk,] [DONE]; or an error event."""

    def __init__(self, task: str, *, include_usage: bool = False) -> None:
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": f"{SCAN_MODEL_PREFIX}{task}"}
        self.include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        return _sse_data({**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def opening(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def events(self, result: ScanResult) -> Iterator[bytes]:
        yield self._chunk({"content": result_json(result)}, None)
        yield self._chunk({}, "stop")
        if self.include_usage:
            yield _sse_data({**self.base, "choices": [], "usage": result.usage.model_dump()})
        yield SSE_DONE

    def failure(self, err: GatewayError) -> Iterator[bytes]:
        # As vLLM and OpenAI end a stream that fails once it has begun; the SDKs raise it.
        yield _sse_data(err.body().model_dump())
        yield SSE_DONE


SSE_DONE = b"data: [DONE]\n\n"


def _sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

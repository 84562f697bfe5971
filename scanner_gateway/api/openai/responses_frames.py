"""Scan tasks as OpenAI models on the Responses API: `client.responses.create(model="scan/<task>")`.

The photos are the `input_image` parts of the user input items; the answer is an
ordinary `response` object whose output text is the validated result JSON (so the SDKs'
`output_text` is it), with the scan envelope in an extra `scan` field. `stream: true`
gets the Responses API's event sequence around that one text.
"""

from __future__ import annotations

import itertools
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


def images_from_input(value: Any) -> list[str]:
    """Image URLs (data URLs or base64) of every user input item's `input_image` parts, in order."""
    if isinstance(value, str):
        return []  # text only
    if not isinstance(value, list):
        raise InvalidRequest("input must be a string or a list of input items", param="input")
    images: list[str] = []
    for part in user_parts(value, "input_image"):
        url = image_part_url(part)
        if not isinstance(url, str) or not url:
            raise InvalidRequest(
                "input_image parts need an image_url (a data URL or base64; file_id is not supported)",
                param="input",
            )
        images.append(url)
    return images


async def scan_as_response(
    service: ScanService,
    task: str,
    request: dict[str, Any],
    priority: PriorityClass,
    idempotency_key: str | None = None,
) -> ScanResult:
    return await run_scan_model(
        service, task, request, lambda r: images_from_input(r.get("input")), priority,
        image_part="input_image", param="input", idempotency_key=idempotency_key,
    )


def response_object(result: ScanResult) -> dict[str, Any]:
    text = result_json(result)
    return _response(f"resp_{result.id}", scan_model_name(result), result.created, "completed",
                     [_message(f"msg_{result.id}", "completed", text)], result)


class ResponseEventStream:
    """The Responses API's event stream for one scan, as OpenAI sends one text answer:
    `response.created` and `response.in_progress` as soon as it opens (before the scan has
    a result, so the ids are its own), the rest around the result JSON when it is there;
    or an `error` event and `response.failed`."""

    def __init__(self, task: str) -> None:
        token = uuid.uuid4().hex
        self.response_id, self.message_id = f"resp_{token}", f"msg_{token}"
        self.model = f"{SCAN_MODEL_PREFIX}{task}"
        self.created_at = int(time.time())
        self._sequence = itertools.count()

    def _event(self, event: dict[str, Any]) -> bytes:
        data = json.dumps({**event, "sequence_number": next(self._sequence)}, ensure_ascii=False)
        return f"event: {event['type']}\ndata: {data}\n\n".encode()

    def _response(self, status: str, output: list[dict[str, Any]], result: ScanResult | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
        return _response(self.response_id, self.model, self.created_at, status, output, result, error)

    def opening(self) -> bytes:
        in_progress = self._response("in_progress", [])
        return b"".join(self._event({"type": kind, "response": in_progress})
                        for kind in ("response.created", "response.in_progress"))

    def events(self, result: ScanResult) -> Iterator[bytes]:
        text = result_json(result)
        item_id = self.message_id
        part = {"type": "output_text", "text": text, "annotations": []}
        located = {"item_id": item_id, "output_index": 0, "content_index": 0}
        done = _message(item_id, "completed", text)
        events: list[dict[str, Any]] = [
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**_message(item_id, "in_progress", text), "content": []}},
            {"type": "response.content_part.added", **located, "part": {**part, "text": ""}},
            {"type": "response.output_text.delta", **located, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **located, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **located, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": done},
            {"type": "response.completed", "response": self._response("completed", [done], result)},
        ]
        yield from (self._event(event) for event in events)

    def failure(self, err: GatewayError) -> Iterator[bytes]:
        yield self._event({"type": "error", "code": err.code, "message": err.message, "param": err.param})
        code = _FAILED_CODES.get(err.code, "rate_limit_exceeded" if err.status == 429 else "server_error")
        yield self._event({"type": "response.failed", "response": self._response(
            "failed", [], error={"code": code, "message": err.message})})


# A failed response's error.code is one of a closed list in the Responses API (the
# `error` event before it carries the gateway's own code).
_FAILED_CODES = {
    "invalid_image": "invalid_image",
    "image_too_large": "image_too_large",
    "unsupported_media_type": "unsupported_image_media_type",
    "image_fetch_failed": "failed_to_download_image",
}


def _message(item_id: str, status: str, text: str) -> dict[str, Any]:
    return {
        "type": "message", "id": item_id, "role": "assistant", "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _response(
    response_id: str, model: str, created_at: int, status: str, output: list[dict[str, Any]],
    result: ScanResult | None = None, error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `response` object; `result` (once there is one) brings the usage and the scan envelope."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": error,
        "incomplete_details": None,
        "instructions": None,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": None,
    }
    if result is not None:
        usage = result.usage
        body["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }
        body["scan"] = scan_envelope(result)
    return body

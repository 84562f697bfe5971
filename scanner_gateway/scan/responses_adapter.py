"""Scan tasks as OpenAI models on the Responses API: `client.responses.create(model="scan/<task>")`.

The photos are the `input_image` parts of the user input items; the answer is an
ordinary `response` object whose output text is the validated result JSON (so the SDKs'
`output_text` is it), with the scan envelope in an extra `scan` field. `stream: true`
gets the Responses API's event sequence around that one text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from scanner_gateway.admission import PriorityClass
from scanner_gateway.errors import InvalidRequest
from scanner_gateway.scan.results import ScanResult
from scanner_gateway.scan.scan_models import (
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
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref  # chat's {"url": ...} shape, leniently
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


def response_object(result: ScanResult, text: str | None = None) -> dict[str, Any]:
    text = result_json(result) if text is None else text
    return _response(result, "completed", [_message(result, "completed", text)])


async def response_events(result: ScanResult) -> AsyncIterator[bytes]:
    """The Responses API's stream for one text answer, as OpenAI sends it."""
    text = result_json(result)
    item_id = _message_id(result)
    part = {"type": "output_text", "text": text, "annotations": []}
    in_progress = _response(result, "in_progress", [])
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**_message(result, "in_progress", text), "content": []}},
        {"type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0,
         "part": {**part, "text": ""}},
        {"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0,
         "delta": text, "logprobs": []},
        {"type": "response.output_text.done", "item_id": item_id, "output_index": 0, "content_index": 0,
         "text": text, "logprobs": []},
        {"type": "response.content_part.done", "item_id": item_id, "output_index": 0, "content_index": 0,
         "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": _message(result, "completed", text)},
        {"type": "response.completed", "response": response_object(result, text)},
    ]
    for number, event in enumerate(events):
        data = json.dumps({**event, "sequence_number": number}, ensure_ascii=False)
        yield f"event: {event['type']}\ndata: {data}\n\n".encode()


def _message_id(result: ScanResult) -> str:
    return f"msg_{result.id}"


def _message(result: ScanResult, status: str, text: str) -> dict[str, Any]:
    return {
        "type": "message", "id": _message_id(result), "role": "assistant", "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _response(result: ScanResult, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    usage = result.usage
    return {
        "id": f"resp_{result.id}",
        "object": "response",
        "created_at": result.created,
        "status": status,
        "model": scan_model_name(result),
        "output": output,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        } if status == "completed" else None,
        "scan": scan_envelope(result),
    }

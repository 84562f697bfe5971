"""Scan tasks as OpenAI models (`scan/<task>`): what the Chat Completions and Responses
adapters share. Each adapter finds the photos in its API's request shape and renders the
result in its API's answer shape; the scan itself is the same `ScanService.run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from scanner_gateway.admission import PriorityClass
from scanner_gateway.errors import InvalidRequest
from scanner_gateway.scan.results import ScanResult
from scanner_gateway.scan.service import ScanService
from scanner_gateway.scan.tasks import parse_locale

SCAN_MODEL_PREFIX = "scan/"


def scan_task_name(model: str) -> str | None:
    return model[len(SCAN_MODEL_PREFIX):] if model.startswith(SCAN_MODEL_PREFIX) else None


def scan_model_name(result: ScanResult) -> str:
    return f"{SCAN_MODEL_PREFIX}{result.task}"


def result_json(result: ScanResult) -> str:
    """The validated result as the answer's text: compact JSON, non-ASCII kept."""
    return json.dumps(result.model_dump(mode="json")["result"], ensure_ascii=False, separators=(",", ":"))


def scan_envelope(result: ScanResult) -> dict[str, Any]:
    """Everything but the result (images, timings, warnings): the answer's extra `scan` field."""
    return result.model_dump(mode="json", exclude={"result"})


def image_part_url(part: dict[str, Any]) -> Any:
    """The URL of an image part, whichever API's shape: `image_url` is `{"url": ...}` in
    Chat Completions and a string in the Responses API; either is taken."""
    ref = part.get("image_url")
    return ref.get("url") if isinstance(ref, dict) else ref


def user_parts(items: list[Any], part_type: str) -> Iterator[dict[str, Any]]:
    """The `part_type` parts of every user message's content list, in order (chat
    messages and Responses input items share this shape)."""
    for item in items:
        if not isinstance(item, dict) or item.get("role") != "user" or item.get("type", "message") != "message":
            continue
        content = item.get("content")
        if isinstance(content, list):
            yield from (p for p in content if isinstance(p, dict) and p.get("type") == part_type)


async def run_scan_model(
    service: ScanService,
    task: str,
    request: dict[str, Any],
    images_of: Callable[[dict[str, Any]], list[str]],
    priority: PriorityClass,
    *,
    image_part: str,
    param: str,
    idempotency_key: str | None = None,
) -> ScanResult:
    service.registry.get(task)  # an unknown model is a 404 whatever the request holds
    images = images_of(request)
    if not images:
        raise InvalidRequest(
            f"model scan/{task} needs at least one {image_part} part in a user message", param=param
        )
    return await service.run(
        task, images, parse_locale(request.get("locale")), priority=priority, idempotency_key=idempotency_key
    )

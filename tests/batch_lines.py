"""Batch input files and output checks shared by the API and end-to-end batch tests."""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.helpers import shelf_jpeg

CHAT = "/v1/chat/completions"
SCAN = "/v1/scan"


def photo_url(seed: int = 5) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(shelf_jpeg(320, 240, seed=seed)).decode()


def chat_line(custom_id: str, model: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "max_tokens": max_tokens,
                     "messages": [{"role": "user", "content": f"say something about {custom_id}"}], **body}}


def scan_model_line(custom_id: str, task: str = "storefront") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": f"scan/{task}", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": photo_url()}}]}]}}


def scan_line(custom_id: str, task: str = "storefront") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": SCAN,
            "body": {"task": task, "images": [photo_url()]}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_custom_id(output: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every answer by its custom_id, asserting each appears exactly once across both files."""
    ids = [entry["custom_id"] for entry in output + errors]
    assert len(ids) == len(set(ids)), f"a custom_id is answered twice: {sorted(ids)}"
    return {entry["custom_id"]: entry for entry in output + errors}

"""Reading a batch's input file: one request per JSONL line, checked line by line.

A line that is not a request (bad JSON, no `custom_id`, another `url`) becomes an entry
of the batch's error file; the batch still runs its good lines. The file as a whole is
refused (`InvalidBatchFile`) only when it cannot be a batch: no line is JSON, a
`custom_id` repeats (its answers could not be told apart), too many lines.
Runs in a worker thread: it reads the whole file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner_gateway.errors import InvalidBatchFile, echo

MAX_CUSTOM_ID_CHARS = 512


@dataclass(frozen=True)
class InputLine:
    line_no: int  # 1-based, as an editor shows it
    custom_id: str | None
    offset: int  # where its bytes are in the file, read again when it runs
    length: int
    error_code: str | None = None  # set: the line is not a request and goes to the error file
    error_message: str | None = None


@dataclass(frozen=True)
class BatchRequest:
    """A good line, read again when it runs."""

    custom_id: str
    url: str
    body: dict[str, Any]


def check_request(line: bytes, endpoint: str) -> BatchRequest:
    """A line as a request to `endpoint`, or ValueError saying what is wrong with it."""
    try:
        fields = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a JSON object ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - a message for the error file, not a type error
    custom_id = fields.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise ValueError(f'"custom_id" must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters')
    unknown = sorted(set(fields) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise ValueError(f"unknown field(s) {echo(unknown)}; a line has custom_id, method, url and body")
    if fields.get("method", "POST") != "POST":
        raise ValueError(f'"method" must be "POST"; got {echo(fields.get("method"))}')
    url = fields.get("url")
    if url != endpoint:
        raise ValueError(f'"url" must be the batch\'s endpoint {endpoint!r}; got {echo(url)}')
    body = fields.get("body")
    if not isinstance(body, dict):
        raise ValueError('"body" must be a JSON object (the request as the endpoint takes it)')  # noqa: TRY004
    if body.get("stream"):
        raise ValueError('"stream" is not supported in a batch: each answer is stored whole')
    return BatchRequest(custom_id, url, body)


def _custom_id_of(line: bytes) -> tuple[bool, str | None]:
    """Whether a line that is not a good request is a JSON object, and its `custom_id`
    when it has one."""
    try:
        fields = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False, None
    if not isinstance(fields, dict):
        return False, None
    custom_id = fields.get("custom_id")
    return True, custom_id if isinstance(custom_id, str) and custom_id else None


def _refuse_repeat(custom_id: str, line_no: int, seen: dict[str, int]) -> None:
    if custom_id in seen:
        raise InvalidBatchFile(
            f"custom_id {echo(custom_id)} is on lines {seen[custom_id]} and {line_no}; "
            "each request needs its own, to tell the answers apart", param="input_file_id",
        )
    seen[custom_id] = line_no


def read_input_file(path: Path, endpoint: str, *, max_items: int, max_line_bytes: int) -> list[InputLine]:
    """Every request line of the file (blank lines skipped), checked. Raises
    InvalidBatchFile when the file cannot be a batch."""
    lines: list[InputLine] = []
    seen: dict[str, int] = {}
    offset = 0
    any_json = False
    with path.open("rb") as file:
        for line_no, raw in enumerate(file, start=1):
            start, offset = offset, offset + len(raw)
            line = raw.strip()
            if not line:
                continue
            if len(lines) >= max_items:
                raise InvalidBatchFile(
                    f"the file has more than {max_items} requests, the most one batch takes "
                    "(SCANNER_BATCH_MAX_ITEMS); split it", param="input_file_id",
                )
            if len(raw) > max_line_bytes:
                lines.append(InputLine(line_no, None, start, len(raw), "line_too_large",
                                       f"line {line_no} is {len(raw)} bytes; a request may be {max_line_bytes}"))
                continue
            try:
                request = check_request(line, endpoint)
            except ValueError as exc:
                is_object, custom_id = _custom_id_of(line)
                any_json = any_json or is_object
                if custom_id is not None:
                    _refuse_repeat(custom_id, line_no, seen)
                lines.append(InputLine(line_no, custom_id, start, len(raw), "invalid_request",
                                       f"line {line_no}: {exc}"))
                continue
            any_json = True
            _refuse_repeat(request.custom_id, line_no, seen)
            lines.append(InputLine(line_no, request.custom_id, start, len(raw)))
    if not lines:
        raise InvalidBatchFile("the input file has no requests (one JSON object per line)", param="input_file_id")
    if not any_json:
        raise InvalidBatchFile(
            "the input file is not JSONL: no line is a JSON object (one request per line: "
            '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}})', param="input_file_id",
        )
    return lines

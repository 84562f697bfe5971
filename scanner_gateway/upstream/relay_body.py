"""What the relay reads in a body it forwards, without parsing it (pure functions)."""

from __future__ import annotations

from scanner_gateway.upstream.relay_media import (
    MEDIA_MARK_FIRST_BYTES,
    opens_media_mark,
    unusual_encoding,
)

_JSON_SPACE = (b" ", b"\t", b"\r", b"\n")
# How a scan model's name can start in JSON (PHP escapes "/" by default).
_SCAN_MODEL_STARTS = (b"scan/", b"scan\\/")


NAMES_SCAN_MODEL, MAY_CARRY_MEDIA = 1, 2
# What a string's first byte may open, indexed by the byte: the loop below looks up one
# int per string instead of comparing prefixes for each.
_OPENS = tuple(
    NAMES_SCAN_MODEL if byte == _SCAN_MODEL_STARTS[0][0] else MAY_CARRY_MEDIA if byte in MEDIA_MARK_FIRST_BYTES else 0
    for byte in range(256)
)


def body_marks(body: bytes) -> int:
    """Cheap pre-check, no parse: which of NAMES_SCAN_MODEL and MAY_CARRY_MEDIA the body
    may deserve; a mark left out means the body surely does not.

    Visits only the string openings (and closings): a quote is found with memchr, and a
    100 KB base64 image holds none, so this costs ~8 us where `b'"scan/' in body` cost
    ~80 us. One pass for both marks: a second one would cost as much again.
    """
    marks = MAY_CARRY_MEDIA if unusual_encoding(body) else 0
    quote = body.find(b'"')
    last = len(body) - 1
    while quote != -1 and quote < last:
        start = quote + 1
        opens = _OPENS[body[start]]
        if opens == NAMES_SCAN_MODEL:
            if body.startswith(_SCAN_MODEL_STARTS, start):
                marks |= NAMES_SCAN_MODEL
        elif opens and opens_media_mark(body, start):
            marks |= MAY_CARRY_MEDIA
        quote = body.find(b'"', start)
    return marks


def may_name_scan_model(body: bytes) -> bool:
    return bool(body_marks(body) & NAMES_SCAN_MODEL)


def with_priority(body: bytes, priority: int) -> bytes:
    """`body` with `"priority": N` as its first member, no parse, one copy.

    JSON parsers (vLLM's included) keep the last of duplicate keys, so a client's own
    `priority` later in the body still wins. Bodies that are not objects pass unchanged.
    """
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        return body
    first = 1
    while stripped[first:first + 1] in _JSON_SPACE:
        first += 1
    separator = b"" if stripped[first:first + 1] == b"}" else b","
    return b"".join((b'{"priority":%d%s' % (priority, separator), memoryview(stripped)[1:]))

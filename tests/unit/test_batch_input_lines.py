"""Reading a batch input file: bad lines are reported one by one, bad files as a whole."""

import json
from pathlib import Path

import pytest

from scanner_gateway.batches.input_lines import read_input_file
from scanner_gateway.errors import InvalidBatchFile

CHAT = "/v1/chat/completions"


def line(custom_id: object, url: str = CHAT, **extra: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "m", "messages": []}, **extra})


def read(tmp_path: Path, *lines: str, max_items: int = 100, max_line_bytes: int = 10_000) -> list:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return read_input_file(path, CHAT, max_items=max_items, max_line_bytes=max_line_bytes)


def test_good_lines_keep_their_place_in_the_file(tmp_path):
    items = read(tmp_path, line("a"), "", line("b"))
    assert [(i.line_no, i.custom_id, i.error_code) for i in items] == [(1, "a", None), (3, "b", None)]
    raw = (tmp_path / "in.jsonl").read_bytes()
    assert json.loads(raw[items[1].offset:items[1].offset + items[1].length])["custom_id"] == "b"


@pytest.mark.parametrize("bad, says", [
    ("{not json", "not a JSON object"),
    (line("x", url="/v1/embeddings"), "must be the batch's endpoint"),
    (json.dumps({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}), '"method" must be "POST"'),
    (json.dumps({"custom_id": "x", "url": CHAT, "body": "text"}), '"body" must be a JSON object'),
    (json.dumps({"custom_id": "", "url": CHAT, "body": {}}), '"custom_id" must be a string'),
    (json.dumps({"custom_id": "x", "url": CHAT, "body": {"stream": True}}), '"stream" is not supported'),
    (json.dumps({"custom_id": "x", "url": CHAT, "body": {}, "extra": 1}), "unknown field"),
])
def test_a_bad_line_is_reported_alone_and_the_rest_runs(tmp_path, bad, says):
    items = read(tmp_path, line("a"), bad)
    assert items[0].error_code is None
    assert items[1].error_code == "invalid_request" and says in items[1].error_message
    assert items[1].error_message.startswith("line 2:")


def test_an_oversize_line_is_reported_alone(tmp_path):
    items = read(tmp_path, line("a"), line("b", body_pad="x" * 500), max_line_bytes=300)
    assert [i.error_code for i in items] == [None, "line_too_large"]


def test_a_repeated_custom_id_refuses_the_file_naming_both_lines(tmp_path):
    with pytest.raises(InvalidBatchFile, match="lines 1 and 3"):
        read(tmp_path, line("a"), line("b"), line("a"))


def test_a_repeated_custom_id_on_a_bad_line_too(tmp_path):
    with pytest.raises(InvalidBatchFile, match="'a'"):
        read(tmp_path, line("a"), line("a", url="/v1/other"))


@pytest.mark.parametrize("content", ["", "\n\n", "hello\nworld\n", "\x89PNG\r\n\x1a\n\x00\x00"])
def test_a_file_that_is_not_jsonl_is_refused(tmp_path, content):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(InvalidBatchFile):
        read_input_file(path, CHAT, max_items=10, max_line_bytes=1000)


def test_too_many_requests_refuse_the_file(tmp_path):
    with pytest.raises(InvalidBatchFile, match="more than 2 requests"):
        read(tmp_path, line("a"), line("b"), line("c"), max_items=2)

"""Batch jobs from Python, without the openai SDK: build a batch file of scans from photos
or photo URLs, upload it, start the batch, follow it, download its answers. httpx only.

    from scanner_gateway.client.batch_client import BatchClient, write_scan_batch

    count = write_scan_batch(["shelves/", "https://cdn.example.com/s1.jpg"], "product_scan", Path("in.jsonl"))
    with BatchClient("http://127.0.0.1:8080", api_key=None) as client:
        batch = client.submit(Path("in.jsonl"), endpoint="/v1/scan")
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from scanner_gateway.client.bulk import find_images
from scanner_gateway.client.scan_client import DEFAULT_TIMEOUT_S, ScanError, _error
from scanner_gateway.urls import root_url

SCAN_ENDPOINT = "/v1/scan"
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
UPLOAD_TIMEOUT_S = 1800.0
POLL_S = 2.0


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def write_scan_batch(sources: Iterable[str | Path], task: str, out: Path, locale: str | None = None) -> tuple[int, list[Path]]:
    """A `/v1/scan` batch file at `out`: one line per photo (files and folders, sent inside
    the file) or photo URL (fetched by the gateway from the hosts it allows); the
    custom_id is the path or URL. Written line by line. (lines, paths not found)."""
    urls = [str(s) for s in sources if isinstance(s, str) and is_url(s)]
    images, missing = find_images(Path(s) for s in sources if not (isinstance(s, str) and is_url(s)))
    lines = 0
    with out.open("w", encoding="utf-8") as file:
        for source in [*urls, *images]:
            if isinstance(source, Path):
                kind = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
                image = f"data:{kind};base64,{base64.b64encode(source.read_bytes()).decode()}"
            else:
                image = source
            body: dict[str, Any] = {"task": task, "images": [image]}
            if locale:
                body["locale"] = locale
            file.write(json.dumps({"custom_id": str(source), "method": "POST", "url": SCAN_ENDPOINT,
                                   "body": body}) + "\n")
            lines += 1
    return lines, missing


class BatchClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=root_url(url), headers=headers, timeout=timeout_s)

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /v1/files; the file is streamed from disk."""
        with path.open("rb") as file:
            return self._json(self._http.post("/v1/files", files={"file": (path.name, file)},
                                              data={"purpose": "batch"}, timeout=UPLOAD_TIMEOUT_S))

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        return self._json(self._http.post("/v1/batches", json=body))

    def submit(self, path: Path, endpoint: str = SCAN_ENDPOINT) -> dict[str, Any]:
        return self.create(self.upload(path)["id"], endpoint)

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/batches/{batch_id}"))

    def wait(self, batch_id: str, on_update: Callable[[dict[str, Any]], None] | None = None,
             poll_s: float = POLL_S) -> dict[str, Any]:
        while True:
            batch = self.retrieve(batch_id)
            if on_update is not None:
                on_update(batch)
            if batch["status"] in FINAL_STATUSES:
                return batch
            time.sleep(poll_s)

    def download(self, file_id: str, out: Path) -> int:
        """A file's content to `out`, streamed; its size."""
        with self._http.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            size = 0
            with out.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
                    size += len(chunk)
        return size


__all__ = ["BatchClient", "ScanError", "write_scan_batch"]

"""ScanClient / AsyncScanClient: the scan API from Python (used by the `scan` CLI too).

    from scanner_gateway.client import ScanClient

    with ScanClient("http://127.0.0.1:8080", api_key=None) as client:
        scan = client.scan("shelf.jpg", task="product_scan")
        print(scan.result)

Connection errors, 429, 502 and 503 are retried, honouring `Retry-After`. Every scan
carries an Idempotency-Key, so a retry of a scan still running or already answered joins
it or gets its result instead of scanning twice; a failed scan is not kept, so its retry
scans again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from scanner_gateway.scan.results import RESULT_MODELS, ScanResult
from scanner_gateway.urls import root_url

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 3
RETRYABLE_STATUSES = frozenset({429, 502, 503})
MAX_BACKOFF_S = 30.0

ImageInput = str | Path | bytes


class ScanError(Exception):
    """The gateway refused or failed a scan (its error code and message), or never answered."""

    def __init__(self, status: int | None, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def _files(images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes]]]:
    items = [images] if isinstance(images, str | Path | bytes) else list(images)
    files = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            files.append(("image", (f"image-{i}.jpg", item)))
        else:
            path = Path(item)
            files.append(("image", (path.name, path.read_bytes())))
    return files


def _error(response: httpx.Response) -> ScanError:
    retry_after = response.headers.get("retry-after")
    try:
        err = response.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {response.status_code}: {response.text[:200]}"
    return ScanError(response.status_code, code, message,
                     float(retry_after) if retry_after and retry_after.isdigit() else None)


def _result(response: httpx.Response) -> ScanResult:
    if response.status_code != 200:
        raise _error(response)
    data = response.json()
    model = RESULT_MODELS.get(data.get("task"))
    if model is not None:  # the typed result of a built-in task (summaries recomputed)
        data["result"] = model.model_validate(data["result"])
    return ScanResult.model_validate(data)


def _backoff(attempt: int, err: ScanError | None) -> float:
    if err is not None and err.retry_after_s is not None:
        return min(err.retry_after_s, MAX_BACKOFF_S)
    return min(0.5 * 2**attempt, MAX_BACKOFF_S)


class _Base:
    def __init__(
        self, base_url: str, api_key: str | None, priority: str | None, retries: int
    ) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if priority:
            self.headers["X-Priority"] = priority
        self.base_url = root_url(base_url)  # the gateway's OpenAI base URL (…/v1) works too
        self.retries = retries

    def _request_args(self, images: ImageInput | Sequence[ImageInput], task: str, locale: str | None) -> dict[str, Any]:
        data = {"task": task, **({"locale": locale} if locale else {})}
        headers = {**self.headers, "Idempotency-Key": uuid.uuid4().hex}
        return {"files": _files(images), "data": data, "headers": headers}

    def _retry_wait(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again, or None when this answer is final."""
        if attempt >= self.retries or (response is not None and response.status_code not in RETRYABLE_STATUSES):
            return None
        return _backoff(attempt, _error(response) if response is not None else None)


def _unreachable(exc: httpx.TransportError | None) -> ScanError:
    return ScanError(None, "connection_error", str(exc) or type(exc).__name__)


def _final(response: httpx.Response | None, exc: httpx.TransportError | None) -> ScanResult:
    if response is None:
        raise _unreachable(exc) from exc
    return _result(response)


def _tasks(response: httpx.Response) -> list[dict[str, Any]]:
    if response.status_code != 200:
        raise _error(response)
    return response.json()["data"]


class ScanClient(_Base):
    def __init__(
        self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, priority: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(base_url, api_key, priority, retries)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def __enter__(self) -> ScanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def scan(
        self, images: ImageInput | Sequence[ImageInput], task: str, *, locale: str | None = None
    ) -> ScanResult:
        args = self._request_args(images, task, locale)
        for attempt in itertools.count():
            response, exc = None, None
            try:
                response = self._http.post("/v1/scan", **args)
            except httpx.TransportError as err:
                exc = err
            wait = self._retry_wait(attempt, response)
            if wait is None:
                return _final(response, exc)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def tasks(self) -> list[dict[str, Any]]:
        try:
            response = self._http.get("/v1/tasks", headers=self.headers)
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return _tasks(response)


class AsyncScanClient(_Base):
    def __init__(
        self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, priority: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES, max_connections: int = 64,
    ) -> None:
        super().__init__(base_url, api_key, priority, retries)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, limits=limits)

    async def __aenter__(self) -> AsyncScanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def scan(
        self, images: ImageInput | Sequence[ImageInput], task: str, *, locale: str | None = None
    ) -> ScanResult:
        args = self._request_args(images, task, locale)
        for attempt in itertools.count():
            response, exc = None, None
            try:
                response = await self._http.post("/v1/scan", **args)
            except httpx.TransportError as err:
                exc = err
            wait = self._retry_wait(attempt, response)
            if wait is None:
                return _final(response, exc)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def tasks(self) -> list[dict[str, Any]]:
        try:
            response = await self._http.get("/v1/tasks", headers=self.headers)
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return _tasks(response)

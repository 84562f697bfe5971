"""EngineClient: one vLLM replica's HTTP API. The only code that speaks HTTP to vLLM.

All replicas share one `aiohttp.ClientSession` per gateway process (built in the app's
lifespan): one connection pool with explicit limits and timeouts. aiohttp rather than
httpx because httpx's pool re-checks every pooled connection on each request, which
cost ~9 ms of CPU per request at 64 connections (see bench/passthrough.py).

Transport failures are translated here, at the boundary, into the gateway's error tree,
so nothing above ever sees an aiohttp exception:

    cannot connect                    -> EngineUnreachable (503; the replica is down)
    engine says 503, or drops the connection before answering
                                      -> UpstreamUnavailable (503; safe to retry elsewhere)
    no answer within the read timeout -> UpstreamTimeout (504)
    dropped connection, engine 5xx, garbage body -> EngineError (502, engine's message)
    engine 401/403 (our upstream key is wrong)   -> EngineAuthFailed (502)
    engine 4xx to a relayed request              -> EngineRejected (its status, OpenAI shape)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from opentelemetry import trace

from scanner_gateway.context import request_id
from scanner_gateway.errors import (
    EngineAuthFailed,
    EngineDropped,
    EngineError,
    EngineRejected,
    EngineSlowToConnect,
    EngineUnreachable,
    ModelNotServed,
    UpstreamTimeout,
    UpstreamUnavailable,
    client_error_for_status,
)
from scanner_gateway.protocol import ChatCompletion, ModelCard, ModelList
from scanner_gateway.tracing import inject_trace_headers

PROBE_TIMEOUT_S = 5.0  # generous: a busy engine's API process answers late, not never
# Below uvicorn's (and so vLLM's) 5 s keep-alive: we drop an idle connection before the
# engine does, so a request never lands on a socket the engine is closing.
KEEPALIVE_S = 4.0
ERROR_BODY_LIMIT = 64 * 1024  # an error body is read whole to judge it; vLLM's are < 1 KB
_REFUSED_CREDENTIALS = frozenset({401, 403})


def build_session(*, connect_timeout_s: float, read_timeout_s: float, max_connections: int) -> aiohttp.ClientSession:
    """The one pooled HTTP session of a gateway process, shared by every replica."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        ),
        auto_decompress=False,  # relay bytes exactly as the engine sent them
        raise_for_status=False,
    )


@contextmanager
def translate_errors(base_url: str, what: str, *, before_answer: bool = True) -> Iterator[None]:
    """aiohttp's exceptions -> ours. `before_answer`: nothing reached our client yet, so a
    connection the engine dropped (it died, or is restarting) is worth a retry elsewhere."""
    try:
        yield
    except aiohttp.ClientConnectorError as exc:
        raise EngineUnreachable(f"engine at {base_url} is unreachable: {exc.os_error!r}") from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise EngineSlowToConnect(f"engine at {base_url}: no connection in time") from exc
    except (TimeoutError, aiohttp.SocketTimeoutError) as exc:
        raise UpstreamTimeout(f"engine at {base_url} did not answer {what} in time") from exc
    except aiohttp.ClientError as exc:
        if before_answer:
            raise EngineDropped(f"engine at {base_url} dropped the connection: {exc!r}") from exc
        raise EngineError(f"connection to the engine failed during {what}: {exc!r}") from exc


def engine_error_message(status: int, body: bytes) -> str:
    """The engine's own message from an error body (OpenAI or FastAPI shapes)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace") or f"HTTP {status}"
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if parsed.get(key):
                return str(parsed[key])
    return json.dumps(parsed)[:500]


def engine_verdict(status: int, body: bytes, retry_after: str | None) -> EngineRejected:
    """A relayed request's 4xx as our error: the engine's own fields when it answered in
    OpenAI's shape (vLLM mostly does), else its message put into that shape."""
    headers = {"Retry-After": retry_after} if retry_after else None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        param = err.get("param")
        return EngineRejected(
            status, err["message"], type=str(err.get("type") or "invalid_request_error"),
            code=err.get("code"), param=param if isinstance(param, str) else None, headers=headers,
        )
    ours = client_error_for_status(status, engine_error_message(status, body))
    return EngineRejected(status, ours.message, type=ours.type, code=ours.code, headers=headers)


def raise_for_engine_status(base_url: str, status: int, body: bytes) -> None:
    if status == 503:
        raise UpstreamUnavailable(f"engine at {base_url} is unavailable: {engine_error_message(status, body)}")
    if status in _REFUSED_CREDENTIALS:
        raise EngineAuthFailed(
            f"engine at {base_url} refused the gateway's credentials ({status}: "
            f"{engine_error_message(status, body)}); SCANNER_UPSTREAM_API_KEY must match vLLM's --api-key"
        )
    if status >= 400:
        raise EngineError(f"engine answered {status}: {engine_error_message(status, body)}")


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of a body (a misbehaving engine's error page can be any size)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


class EngineClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, api_key: str | None = None) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _headers(self, **extra: str) -> dict[str, str]:
        rid = request_id.get()
        headers = {**extra, **self._auth, **({"X-Request-Id": rid} if rid else {})}
        inject_trace_headers(headers)  # vLLM's spans (--otlp-traces-endpoint) join the request's trace
        return headers

    async def _get(self, path: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        with translate_errors(self.base_url, path):
            async with self._session.get(f"{self.base_url}{path}", headers=self._headers(), timeout=timeout) as resp:
                body = await resp.read()
        raise_for_engine_status(self.base_url, resp.status, body)
        return body

    async def open_stream(self, path: str, body: bytes, content_type: str) -> aiohttp.ClientResponse:
        """POST raw bytes; return the response with its body not yet read.

        The caller relays the body and must close the response (closing the connection
        aborts the request in vLLM). A 503 raises UpstreamUnavailable (nothing reached the
        client yet, so the pool may retry elsewhere); any other 5xx raises EngineError, a
        502 with the engine's message: to the client it is a fault of the server behind the
        gateway (vLLM answers 500 when, say, it cannot fetch an image URL), never a 500 of
        the gateway's own; so does a 401/403, the gateway's key being wrong. Other 4xx
        raise EngineRejected, the engine's verdict (which names the bad field) with its
        status, for the client.
        """
        headers = self._headers(**{"Content-Type": content_type or "application/json"})
        with translate_errors(self.base_url, path):
            resp = await self._session.post(f"{self.base_url}{path}", data=body, headers=headers)
            if resp.status < 400:
                return resp
            try:
                detail = await read_bounded(resp, ERROR_BODY_LIMIT)
            finally:
                if resp.content.at_eof():
                    resp.release()  # read to its end: the connection goes back to the pool
                else:
                    resp.close()
        if resp.status >= 500 or resp.status in _REFUSED_CREDENTIALS:
            raise_for_engine_status(self.base_url, resp.status, detail)
        raise engine_verdict(resp.status, detail, resp.headers.get("Retry-After"))

    async def relay(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body of an `open_stream` response, chunk by chunk as it arrives."""
        with translate_errors(self.base_url, "the response body", before_answer=False):
            async for chunk in resp.content.iter_any():
                yield chunk

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion:
        with translate_errors(self.base_url, "/v1/chat/completions"):
            async with self._session.post(
                f"{self.base_url}/v1/chat/completions", json=payload, headers=self._headers()
            ) as resp:
                body = await resp.read()
        if resp.status == 404:
            raise ModelNotServed(f"engine at {self.base_url}: {engine_error_message(resp.status, body)}")
        raise_for_engine_status(self.base_url, resp.status, body)
        try:
            completion = ChatCompletion.model_validate_json(body)
        except ValueError as exc:
            raise EngineError(f"engine returned an unreadable completion: {exc}") from exc
        span = trace.get_current_span()
        if span.is_recording():  # GenAI semantic conventions, on the pool's attempt span
            span.set_attribute("gen_ai.system", "vllm")
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.request.model", str(payload.get("model", "")))
            span.set_attribute("gen_ai.response.model", completion.model)
            if completion.usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", completion.usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", completion.usage.completion_tokens)
        return completion

    async def list_models(self) -> list[ModelCard]:
        body = await self._get("/v1/models")
        try:
            return ModelList.model_validate_json(body).data
        except ValueError as exc:
            raise EngineError(f"engine returned an unreadable model list: {exc}") from exc

    async def health(self) -> None:
        """Raises an UpstreamError unless the engine's /health answers 2xx."""
        await self._get("/health")

    async def metrics_text(self) -> str:
        return (await self._get("/metrics")).decode(errors="replace")

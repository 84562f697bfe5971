"""EngineClient: the only code that talks HTTP to vLLM.

One `httpx.AsyncClient` per gateway process (built in the app's lifespan) with explicit
pool limits and timeouts. Transport failures are translated here, at the boundary, into
the gateway's error tree, so nothing above ever sees an httpx exception:

    cannot connect / engine says 503  -> UpstreamUnavailable (503)
    no answer within the read timeout -> UpstreamTimeout (504)
    dropped connection, engine 4xx/5xx, garbage body -> EngineError (502, engine's message)
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from scanner_gateway.errors import EngineError, UpstreamTimeout, UpstreamUnavailable
from scanner_gateway.protocol import ChatCompletion, ModelCard, ModelList

HEALTH_TIMEOUT_S = 2.0


def build_http_client(
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The one pooled client of a gateway process. `transport` is for fake engines in tests."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=connect_timeout_s
        ),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
    )


def engine_error_message(response: httpx.Response) -> str:
    """The engine's own message from an error body (OpenAI or FastAPI shapes)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return json.dumps(body)[:500]


class EngineClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model

    async def _send(
        self, method: str, path: str, *, stream: bool = False, timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request; transport failures become gateway errors. Status is not checked."""
        extra = {"timeout": timeout} if timeout is not None else {}
        headers = {**kwargs.pop("headers", {}), **self._headers}  # our engine key wins
        request = self._http.build_request(
            method, f"{self.base_url}{path}", headers=headers, **kwargs, **extra
        )
        try:
            return await self._http.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamUnavailable(f"engine at {self.base_url} is unreachable: {exc!r}") from exc
        except httpx.PoolTimeout as exc:
            raise UpstreamUnavailable("no free connection to the engine; try again") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"engine did not answer {path} in time") from exc
        except httpx.TransportError as exc:
            raise EngineError(f"connection to the engine failed mid-request: {exc!r}") from exc

    async def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        response = await self._send(method, path, timeout=timeout, **kwargs)
        if response.status_code == 503:
            raise UpstreamUnavailable(f"engine is unavailable: {engine_error_message(response)}")
        if response.status_code >= 400:
            raise EngineError(
                f"engine answered {response.status_code}: {engine_error_message(response)}"
            )
        return response

    async def open_stream(
        self, method: str, path: str, *, content: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """Forward raw bytes and return the response with its body not yet read.

        The caller relays the body and must close the response (closing aborts the
        request in vLLM). Engine error statuses are returned, not raised: a
        pass-through hands the engine's own error body to its client.
        """
        return await self._send(method, path, stream=True, content=content, headers=headers)

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion:
        response = await self._request("POST", "/v1/chat/completions", json=payload)
        try:
            return ChatCompletion.model_validate_json(response.content)
        except ValueError as exc:
            raise EngineError(f"engine returned an unreadable completion: {exc}") from exc

    async def list_models(self) -> list[ModelCard]:
        response = await self._request("GET", "/v1/models", timeout=HEALTH_TIMEOUT_S)
        try:
            return ModelList.model_validate_json(response.content).data
        except ValueError as exc:
            raise EngineError(f"engine returned an unreadable model list: {exc}") from exc

    async def model_name(self) -> str:
        """The configured model, else the engine's first served model (cached once found)."""
        if self._model is None:
            models = await self.list_models()
            if not models:
                raise EngineError("the engine serves no models")
            self._model = models[0].id
        return self._model

    async def healthy(self) -> bool:
        try:
            await self._request("GET", "/health", timeout=HEALTH_TIMEOUT_S)
        except (UpstreamUnavailable, UpstreamTimeout, EngineError):
            return False
        return True

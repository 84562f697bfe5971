"""Request-body intake: size cap, enforced while the body streams in, and no compressed
bodies (pure ASGI middleware)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scanner_gateway.errors import PayloadTooLarge, UnsupportedMedia, error_response


class BodySizeLimit:
    """413 before reading when Content-Length is too big; otherwise stop at the cap.

    Chunked uploads without a length are counted as they arrive, so no request can make
    the gateway buffer more than `max_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error()).__call__(scope, receive, send)
            return
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding != "identity":
            # Read as-is, a compressed body would fail later as "invalid JSON" or reach
            # vLLM, which does not decompress either: say what is wrong instead.
            err = UnsupportedMedia(
                f"request bodies are read uncompressed; Content-Encoding {encoding!r} is not accepted "
                "(photos are compressed already)",
                param="content-encoding",
            )
            await error_response(err)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes", param="body")

"""The HTTP side of the error tree: every error leaves as `{"error": {"message", "type",
"code", "param"}}`, whatever raised it: our own tree, FastAPI's request validation,
Starlette's HTTP exceptions, or a bug (500, message hidden)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scanner_gateway.errors import (
    GatewayError,
    client_error_for_status,
    invalid_request_from,
    log_if_server_side,
)

log = logging.getLogger("scanner_gateway.errors")  # the logger whose 5xx lines are throttled


def error_response(err: GatewayError) -> JSONResponse:
    return JSONResponse(
        err.body().model_dump(), status_code=err.status, headers=err.headers or None
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(log_if_server_side(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request_from(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # Starlette's routing miss
            path = request.url.path[:200]
            message = f"{request.method} {path} is not served here; the routes are listed at /docs"
        elif exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            message = f"{request.method} is not allowed on {request.url.path[:200]}; use {exc.headers['Allow']}"
        # its headers too (Allow on a 405)
        return error_response(client_error_for_status(exc.status_code, message, dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(GatewayError("internal error; see gateway logs"))

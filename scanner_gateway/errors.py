"""The gateway's errors: a typed tree with stable codes and statuses, framework-free.

    GatewayError                      500 internal_error
    +-- ClientError                   400 invalid_request (the client's to fix)
    |   +-- InvalidRequest, InvalidBatchFile, BatchStateConflict (409), Unauthorized (401),
    |   |   ImageFetchFailed, MediaKindRefused, UnknownTask / NotFound (404), MethodNotAllowed (405), BodyTimeout (408),
    |   |   PayloadTooLarge / ImageTooLarge (413), UnsupportedMedia (415),
    |   |   InvalidImage / IdempotencyKeyReused (422), EngineRejected (the engine's 4xx),
    |   |   ClientClosedRequest (499)
    |   +-- Overloaded (429, Retry-After) +-- KeyOverLimit
    +-- UpstreamError                 502 engine_error (the engine's fault)
    |   +-- EngineError +-- EngineAuthFailed, ModelNotServed
    |   +-- ModelOutputInvalid
    |   +-- UpstreamUnavailable (503) +-- EngineUnreachable, EngineFlaky (+-- EngineDropped,
    |   |                                 EngineSlowToConnect)
    |   +-- UpstreamTimeout (504)
    +-- Draining                      503 draining

The domain raises these; the HTTP layer (`api/errors.py`) renders every one as
`{"error": {"message", "type", "code", "param"}}` (OpenAI's shape).
"""

from __future__ import annotations

import logging
import reprlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

from scanner_gateway.protocol import ErrorBody, ErrorResponse

SERVER_ERROR_LOG_INTERVAL_S = 1.0
ANSWERED = "answered %d %s: %s"  # status, code, message
_ECHO = reprlib.Repr()
_ECHO.maxstring = 60


def echo(value: object) -> str:
    """A client's value, quoted for an error message and cut short (a 5 KB task name is
    not echoed back whole)."""
    return _ECHO.repr(value)


class ServerErrorThrottle(logging.Filter):
    """Lets one "answered 5xx" line per (status, code) through per interval and counts
    the rest into the next one: an engine outage at hundreds of requests per second must
    not become hundreds of identical warnings per second. Other records pass."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[Any, ...], float] = {}
        self._held: Counter[tuple[Any, ...]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != ANSWERED or not isinstance(record.args, tuple):
            return True
        key = record.args[:2]
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._held[key] += 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it since the last such line)"
        return True


log = logging.getLogger(__name__)
log.addFilter(ServerErrorThrottle(SERVER_ERROR_LOG_INTERVAL_S))


class GatewayError(Exception):
    """Base of every error the gateway answers on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, code=self.code, param=self.param)
        )


class ClientError(GatewayError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class InvalidRequest(ClientError):
    pass


class InvalidBatchFile(ClientError):
    """A batch's input file that cannot be a batch as a whole (not JSONL, repeated
    `custom_id`s, too many lines); a bad line alone goes to the batch's error file."""

    code = "invalid_batch_file"


class BatchStateConflict(ClientError):
    """An action the batch's state does not allow (cancelling a finished batch)."""

    status = 409
    code = "batch_state_conflict"


class Unauthorized(ClientError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class ImageFetchFailed(ClientError):
    """An image URL the client named could not be fetched (its host's fault or the
    client's, not the gateway's)."""

    code = "image_fetch_failed"


class MediaKindRefused(ClientError):
    """A relayed request carries a kind of media (video, audio, files, embeddings) the
    operator has not turned on."""

    code = "media_kind_not_allowed"


class UnknownTask(ClientError):
    status = 404
    code = "unknown_task"
    type = "not_found_error"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    type = "not_found_error"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class BodyTimeout(ClientError):
    """The request body did not arrive in time (a stalled upload, or a slowloris)."""

    status = 408
    code = "body_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class UnsupportedMedia(ClientError):
    status = 415
    code = "unsupported_media_type"


class InvalidImage(ClientError):
    status = 422
    code = "invalid_image"


class IdempotencyKeyReused(ClientError):
    status = 422
    code = "idempotency_key_reused"


class Overloaded(ClientError):
    status = 429
    code = "overloaded"
    type = "rate_limit_error"

    def __init__(
        self, message: str, *, retry_after_s: int = 1, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, headers={**(headers or {}), "Retry-After": str(retry_after_s)})


class KeyOverLimit(Overloaded):
    """This client (API key) has its share of requests open; others are still served."""

    code = "key_over_limit"


class EngineRejected(ClientError):
    """The engine refused a relayed request (a 4xx of vLLM's: bad field, unknown model).

    The client's mistake, so its status and the engine's own message, type, code and
    param go back as they came; a body not in OpenAI's shape (FastAPI's `{"detail"}`,
    plain text) is put into it.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | int | None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, headers=headers)
        self.status, self.type, self.code = status, type, code  # type: ignore[misc]


class ClientClosedRequest(ClientError):
    """The client hung up before the answer, and its work was stopped. Nobody reads this
    answer: its status (nginx's 499) is for logs and metrics."""

    status = 499
    code = "client_closed_request"


class UpstreamError(GatewayError):
    status = 502
    code = "engine_error"
    type = "upstream_error"


class EngineError(UpstreamError):
    pass


class EngineAuthFailed(EngineError):
    """The engine refused the gateway's own credentials: SCANNER_UPSTREAM_API_KEY does not
    match vLLM's --api-key. An operator's fault, never the client's (so not a 401)."""

    code = "engine_auth_failed"


class ModelNotServed(EngineError):
    """The engine answered 404 to a completion: it does not serve the model asked for
    (restarted with another model, e.g. in a rolling upgrade)."""


class ModelOutputInvalid(UpstreamError):
    code = "model_output_invalid"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class EngineUnreachable(UpstreamUnavailable):
    """No connection to the engine could be made: it is down, not just busy."""


class EngineFlaky(UpstreamUnavailable):
    """A connection failed in a way a busy engine can cause too: counted towards
    ejection, never ejecting on its own, and worth one more try on a fresh connection."""


class EngineDropped(EngineFlaky):
    """The engine closed the connection before answering: it died, or it closed an idle
    keep-alive connection just as we reused it (a race, not a fault)."""


class EngineSlowToConnect(EngineFlaky):
    """No connection within the connect timeout: a host or network too busy to answer
    in time (a 2-CPU box at full load does this), not proof that the engine is down."""


class Draining(GatewayError):
    status = 503
    code = "draining"
    type = "server_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


# Status codes Starlette raises itself (routing, body limits), mapped to our tree.
_HTTP_STATUS_ERRORS: dict[int, type[ClientError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
}


def client_error_for_status(status: int, message: str, headers: dict[str, str] | None = None) -> ClientError:
    """A 4xx someone else decided (Starlette's routing, the engine) as one of ours,
    keeping its status even where our tree has no class for it."""
    err = _HTTP_STATUS_ERRORS.get(status, InvalidRequest)(message, headers=headers)
    err.status = status  # type: ignore[misc]
    return err


MAX_LISTED_PROBLEMS = 5
_LOCATION_ROOTS = frozenset({"body", "query", "path", "header"})


def log_if_server_side(err: GatewayError) -> GatewayError:
    """A 5xx answered to a client is logged with its cause (the access log has only the
    status); 4xx are the client's business and stay out of the log."""
    if err.status >= 500:
        log.warning(ANSWERED, err.status, err.code, err.message)
    return err


def invalid_request_from(errors: Sequence[Any]) -> InvalidRequest:
    """A 400 listing pydantic's/FastAPI's validation errors; `param` names the first.

    All of them, not just the first: a misspelt field is both "images: Field required"
    and "image: Extra inputs are not permitted", and only the pair says what to fix.
    """
    problems = []
    for error in errors[:MAX_LISTED_PROBLEMS]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in _LOCATION_ROOTS)
        msg = error.get("msg", "invalid request")
        problems.append((loc or None, f"{loc}: {msg}" if loc else msg))
    if not problems:
        return InvalidRequest("invalid request")
    more = len(errors) - len(problems)
    message = "; ".join(text for _, text in problems) + (f"; and {more} more" if more > 0 else "")
    return InvalidRequest(message, param=problems[0][0])

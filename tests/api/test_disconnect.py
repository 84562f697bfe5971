"""A scan whose client hangs up is cancelled: its admission slot and engine request are freed
(FAKE ENGINE that takes its time; the gateway on a real socket)."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from scanner_gateway.app import create_app
from tests.api.test_observability import value
from tests.api.test_scan_api import PHOTO
from tests.fake_engine import FakeReply
from tests.helpers import serve_in_thread


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# A short body deadline too: it bounds the upload only, never the wait for a disconnect.
@pytest.mark.parametrize("body_timeout_s", [120.0, 0.3])
def test_scan_is_cancelled_when_the_client_leaves(settings, fake_engine, body_timeout_s):
    fake_engine.answer = lambda _: FakeReply(delay_s=5.0)
    server_log = Records()
    with serve_in_thread(create_app(settings.model_copy(update={"body_timeout_s": body_timeout_s}))) as url:
        logging.getLogger("uvicorn.error").addHandler(server_log)  # uvicorn's loggers do not reach caplog
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/scan", files={"image": ("a.jpg", PHOTO)}, data={"task": "storefront"},
                           timeout=1.0)
            time.sleep(0.5)  # the engine would still be "generating" for 3.5 s
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            logging.getLogger("uvicorn.error").removeHandler(server_log)
    # A client hanging up is routine on store networks: no "Exception in ASGI application".
    assert not [m for m in server_log.messages if "Exception" in m], server_log.messages
    assert value(metrics, "scanner_scans_total", task="storefront", outcome="client_closed_request") == 1
    assert value(metrics, "scanner_admission_in_flight") == 0
    assert value(metrics, "scanner_requests_total", route="/v1/scan", method="POST", status="499") == 1

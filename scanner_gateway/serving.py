"""Run the gateway under uvicorn, with a drain period on SIGTERM.

On SIGTERM (an orchestrator stopping the pod) the gateway first reports not-ready on
/ready for `drain_s` while still serving, so load balancers stop sending it traffic;
then uvicorn stops accepting, finishes in-flight requests (up to
`graceful_timeout_s`) and exits. SIGINT (Ctrl-C at a terminal) skips the drain period,
and a second signal stops at once.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from scanner_gateway.config import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self.drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and self.drain_until is None:
            self.drain_until = time.monotonic() + self.drain_s
            self.app.state.draining = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self._captured_signals.append(signal.SIGTERM)  # exit as if uvicorn had caught it
            return True
        return await super().on_tick(counter)


def run_gateway(settings: Settings, workers: int = 1) -> None:
    from scanner_gateway.app import create_app

    common = dict(
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )
    if workers == 1:
        app = create_app(settings)
        DrainingServer(uvicorn.Config(app, **common), app, settings.drain_s).run()
        return
    # Worker processes build their own app from the environment: hand them our settings.
    # (uvicorn's supervisor forwards SIGTERM to them at once: no drain period here.)
    os.environ.update(settings.as_env())
    uvicorn.run("scanner_gateway.app:create_app_from_env", factory=True, workers=workers, **common)

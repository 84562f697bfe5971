"""Run the gateway under uvicorn, with a drain period on SIGTERM.

On SIGTERM (an orchestrator stopping the pod) the gateway first reports not-ready on
/ready for `drain_s` while still serving, so load balancers stop sending it traffic;
then uvicorn stops accepting, finishes in-flight requests (up to
`graceful_timeout_s`) and exits. SIGINT (Ctrl-C at a terminal) skips the drain period,
and a second signal stops at once.
"""

from __future__ import annotations

import logging
import logging.config
import os
import shutil
import signal
import tempfile
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from scanner_gateway.config import Settings
from scanner_gateway.logs import logging_config

log = logging.getLogger(__name__)


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
    common = dict(
        host=settings.host,
        port=settings.port,
        log_config=logging_config(),
        access_log=False,  # the gateway writes its own JSON access lines (with request ids)
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )
    if workers == 1:
        from scanner_gateway.app import create_app

        app = create_app(settings)
        DrainingServer(uvicorn.Config(app, **common), app, settings.drain_s).run()
        return
    # Worker processes build their own app from the environment: hand them our settings,
    # and a directory where each writes its metrics for /metrics to merge. (uvicorn's
    # supervisor forwards SIGTERM to the workers at once: no drain period here.)
    share = settings.for_one_of(workers)
    logging.config.dictConfig(common["log_config"])  # this supervisor logs before uvicorn does
    log.info(
        "%d workers share the admission limits: each runs up to %d per replica and queues up to %d",
        workers, share.max_in_flight_per_replica, share.queue_limit,
    )
    os.environ.update(share.as_env())
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="scanner-metrics-")
    try:
        uvicorn.run("scanner_gateway.app:create_app_from_env", factory=True, workers=workers, **common)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)

"""Run the gateway under uvicorn: one process, or N workers under uvicorn's supervisor.

Either way each serving process drains on SIGTERM (`drain.py`, from the app's lifespan),
then uvicorn stops accepting, finishes in-flight requests (up to `graceful_timeout_s`)
and exits. SIGINT (Ctrl-C at a terminal) skips the drain period.
"""

from __future__ import annotations

import logging
import logging.config
import os
import shutil
import tempfile

import uvicorn

from scanner_gateway.config import Settings
from scanner_gateway.logs import logging_config

log = logging.getLogger(__name__)
# uvicorn's supervisor SIGKILLs a worker that misses a health ping for this long, with
# whatever it is serving. Its 5 s default killed busy workers on a box shared with a CPU
# engine (timers seconds late); a worker truly hung still goes, a minute later.
WORKER_HEALTHCHECK_TIMEOUT_S = 60


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
        uvicorn.Server(uvicorn.Config(app, **common)).run()
        return
    # Worker processes build their own app from the environment: hand them our settings,
    # and a directory where each writes its metrics for /metrics to merge. (uvicorn's
    # supervisor forwards SIGTERM to the workers at once; each drains, see drain.py.)
    share = settings.for_one_of(workers)
    logging.config.dictConfig(common["log_config"])  # this supervisor logs before uvicorn does
    log.info(
        "%d workers share the admission limits: each runs up to %s per replica and queues up to %d",
        workers, share.max_in_flight_per_replica or "what the engines take", share.queue_limit,
    )
    os.environ.update(share.as_env())
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="scanner-metrics-")
    try:
        uvicorn.run("scanner_gateway.app:create_app_from_env", factory=True, workers=workers,
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S, **common)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)

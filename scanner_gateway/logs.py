"""Structured JSON logs: one object per line, each with the request id when there is one.

Never log image bytes, request bodies or keys: log lines carry sizes, codes and ids.
"""

from __future__ import annotations

import logging
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS

from scanner_gateway.context import request_id

# uvicorn attaches an ANSI-coloured copy of some messages; a log shipper wants one plain message.
_NOT_LOGGED = [*RESERVED_ATTRS, "color_message"]


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for the gateway and uvicorn (also given to uvicorn)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(levelname)s %(name)s %(message)s %(request_id)s %(process)d",
                # pid: which of `serve --workers N` wrote the line
                "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
                "timestamp": "time",  # ISO 8601 in UTC with microseconds, which log shippers parse as-is
                "reserved_attrs": _NOT_LOGGED,
            }
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"]}
        },
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.access": {"level": "WARNING"},  # the gateway writes its own access lines
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }

"""Structured JSON logs: one object per line, each with the request id when there is one.

Never log image bytes, request bodies or keys: log lines carry sizes, codes and ids.
"""

from __future__ import annotations

import logging
from typing import Any

from scanner_gateway.context import request_id


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
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
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

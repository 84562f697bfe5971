import logging
import time

from scanner_gateway.errors import ANSWERED, ServerErrorThrottle


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("scanner_gateway.errors", logging.WARNING, __file__, 1, msg, args, None)


def test_identical_5xx_lines_are_throttled_and_counted():
    throttle = ServerErrorThrottle(interval_s=0.05)
    first = record(ANSWERED, 503, "upstream_unavailable", "engine down")
    assert throttle.filter(first)
    assert not any(throttle.filter(record(ANSWERED, 503, "upstream_unavailable", "engine down")) for _ in range(4))
    assert throttle.filter(record(ANSWERED, 504, "upstream_timeout", "slow"))  # another kind passes
    assert throttle.filter(record("unhandled error"))  # not an answered line: never held back
    time.sleep(0.06)
    later = record(ANSWERED, 503, "upstream_unavailable", "engine down")
    assert throttle.filter(later)
    assert later.getMessage() == "answered 503 upstream_unavailable: engine down (and 4 more like it since the last such line)"

import logging
import time

from scanner_gateway.errors import (
    ANSWERED,
    MAX_LISTED_PROBLEMS,
    ServerErrorThrottle,
    invalid_request_from,
)


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


def test_validation_errors_are_listed_up_to_a_bound():
    errors = [{"loc": ("body", "images", i), "msg": "Input should be a valid string"} for i in range(8)]
    err = invalid_request_from(errors)
    assert err.param == "images.0"
    assert err.message.count("Input should be a valid string") == MAX_LISTED_PROBLEMS
    assert err.message.endswith(f"; and {8 - MAX_LISTED_PROBLEMS} more")
    assert invalid_request_from([{"msg": "JSON decode error"}]).message == "JSON decode error"
    assert invalid_request_from([]).message == "invalid request"

import pytest
from pydantic import ValidationError

from scanner_gateway.config import Settings


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://engine:8000", ["http://engine:8000"]),
        ("http://engine:8000/", ["http://engine:8000"]),
        ("http://engine:8000/v1", ["http://engine:8000"]),  # an OpenAI SDK base URL
        ("http://engine:8000/v1/, http://b:9000", ["http://engine:8000", "http://b:9000"]),
        ("http://proxy/vllm-a/v1", ["http://proxy/vllm-a"]),
    ],
)
def test_upstreams_are_engine_roots(given, expected):
    assert Settings(upstreams=given).upstream_urls() == expected


def test_single_upstream_url_is_normalised_too():
    assert Settings(upstream_url="http://engine:8000/v1/").upstream_urls() == ["http://engine:8000"]


def test_a_malformed_upstream_stops_startup():
    with pytest.raises(ValidationError):
        Settings(upstreams="engine:8000 oops").upstream_urls()


@pytest.mark.parametrize(
    ("cap", "queue", "workers", "each"),
    [(8, 256, 2, (4, 128)), (8, 256, 3, (2, 85)), (2, 3, 4, (1, 0)), (32, 256, 1, (32, 256))],
)
def test_workers_share_the_admission_limits(cap, queue, workers, each):
    share = Settings(max_in_flight_per_replica=cap, queue_limit=queue).for_one_of(workers)
    assert (share.max_in_flight_per_replica, share.queue_limit) == each

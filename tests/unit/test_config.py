import pytest
from pydantic import ValidationError

from scanner_gateway.config import Settings, settings_problems


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
        Settings(upstreams="engine:8000 oops")  # when the settings are read, not later


def test_bad_settings_are_named_as_the_operator_set_them(monkeypatch):
    monkeypatch.setenv("SCANNER_MAX_IN_FLIGHT_PER_REPLICA", "lots")
    monkeypatch.setenv("SCANNER_UPSTREAMS", "http://engine-0:8000,engine 1")
    monkeypatch.setenv("SCANNER_UPSTREAM_API_KEY", "s3cret")
    with pytest.raises(ValidationError) as caught:
        Settings(port=0)
    problems = settings_problems(caught.value)
    assert len(problems) == 3
    assert any(p.startswith("SCANNER_MAX_IN_FLIGHT_PER_REPLICA: ") and "'lots'" in p for p in problems)
    assert any(p.startswith("SCANNER_UPSTREAMS: 'engine 1' is not an http(s) URL") for p in problems)
    assert any(p.startswith("SCANNER_PORT: ") for p in problems)
    assert "s3cret" not in " ".join(problems)


def test_a_command_with_bad_settings_says_what_and_exits_2(monkeypatch):
    from typer.testing import CliRunner

    from scanner_gateway.cli import app

    monkeypatch.setenv("SCANNER_QUEUE_LIMIT", "-")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "invalid settings" in result.output
    assert "SCANNER_QUEUE_LIMIT: " in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("cap", "queue", "workers", "each"),
    [(8, 256, 2, (4, 128)), (8, 256, 3, (2, 85)), (2, 3, 4, (1, 0)), (32, 256, 1, (32, 256))],
)
def test_workers_share_the_admission_limits(cap, queue, workers, each):
    share = Settings(max_in_flight_per_replica=cap, queue_limit=queue).for_one_of(workers)
    assert (share.max_in_flight_per_replica, share.queue_limit) == each


@pytest.mark.parametrize(("per_key", "workers", "each"), [(0, 4, 0), (8, 2, 4), (3, 4, 1), (5, 1, 5)])
def test_workers_share_each_keys_limit_and_off_stays_off(per_key, workers, each):
    assert Settings(max_in_flight_per_key=per_key).for_one_of(workers).max_in_flight_per_key == each


def test_workers_share_the_body_memory():
    assert Settings(max_buffered_bytes=1 << 30).for_one_of(4).max_buffered_bytes == 1 << 28


def test_image_workers_default_to_the_usable_cpus_at_most_eight(monkeypatch):
    from scanner_gateway import config

    for cpus, expected in ((2, 2), (16, 8)):
        monkeypatch.setattr(config, "usable_cpus", lambda cpus=cpus: cpus)
        assert Settings().image_worker_count() == expected
    assert Settings(image_workers=3).image_worker_count() == 3


def test_image_queue_holds_every_photo_admitted_scans_can_bring(caplog):
    from scanner_gateway.app import image_queue_limit
    from scanner_gateway.config import default_prompts_dir
    from scanner_gateway.scan.tasks import TaskRegistry

    registry = TaskRegistry.load(default_prompts_dir())
    most = registry.most_images()
    assert image_queue_limit(Settings(), registry, max_in_flight=128) == 128 * most
    assert image_queue_limit(Settings(image_queue_limit=100_000), registry, max_in_flight=128) == 100_000
    assert not caplog.records
    assert image_queue_limit(Settings(image_queue_limit=64), registry, max_in_flight=128) == 64
    assert "SCANNER_IMAGE_QUEUE_LIMIT=64" in caplog.text  # an operator's smaller queue is kept, with a warning


@pytest.mark.parametrize(("cpu_max", "limit"), [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1),
                                               ("max 100000", None), (None, None), ("garbage", None)])
def test_usable_cpus_honour_a_cgroup_cpu_quota(tmp_path, cpu_max, limit):
    from scanner_gateway.config import usable_cpus

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    unbounded = usable_cpus(tmp_path / "absent")
    assert usable_cpus(path) == (unbounded if limit is None else min(unbounded, limit))

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scanner_gateway.engine.launcher import (
    NO_MEDIA_HOST,
    EngineOptions,
    EngineStartError,
    ManagedEngine,
    engine_command,
    engine_env,
)


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_engine_command_carries_the_flags_the_gateway_relies_on():
    cmd = engine_command(EngineOptions(model="/m", served_model_name="dev", port=8123, max_images=4,
                                       max_image_pixels=1228800, max_model_len=20480, api_key="k"), "vllm")
    assert cmd[:3] == ["vllm", "serve", "/m"]
    assert flag(cmd, "--served-model-name") == "dev" and flag(cmd, "--port") == "8123"
    limit = json.loads(flag(cmd, "--limit-mm-per-prompt"))
    assert limit["video"] == 0 and limit["image"]["count"] == 4
    assert limit["image"]["width"] % 32 == 0 and limit["image"]["width"] ** 2 >= 1228800
    so = json.loads(flag(cmd, "--structured-outputs-config"))
    assert so == {"backend": "guidance", "disable_any_whitespace": True}
    assert flag(cmd, "--generation-config") == "vllm"
    assert flag(cmd, "--scheduling-policy") == "priority"
    assert flag(cmd, "--max-model-len") == "20480" and flag(cmd, "--api-key") == "k"


def test_engine_env_is_offline_only_for_local_models(tmp_path):
    assert engine_env(str(tmp_path), base={})["HF_HUB_OFFLINE"] == "1"
    env = engine_env("Ostrakon/Ostrakon-VL-8B", base={})
    assert "HF_HUB_OFFLINE" not in env and env["VLLM_CPU_KVCACHE_SPACE"]


def test_the_engine_may_fetch_no_media_and_follows_no_redirect():
    cmd = engine_command(EngineOptions(model="/m"), "vllm")
    assert flag(cmd, "--allowed-media-domains") == NO_MEDIA_HOST  # an empty list would allow every host
    assert "--allowed-local-media-path" not in cmd
    assert engine_env("/m", base={"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "1"})["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    for arg in ("--allowed-local-media-path=/", "--allowed-media-domains", "--allowed-media-domains=a.com"):
        with pytest.raises(EngineStartError, match="SCANNER_IMAGE_URL_HOSTS"):
            engine_command(EngineOptions(model="/m", extra_args=[arg]), "vllm")


# Stand-ins for `vllm serve`: an API process (a shell) with an engine-core child in its
# process group, which writes both pids. Real vLLM is started in tests/e2e; here the
# point is process lifetimes, whatever the engine is.
def stand_in(tmp_path: Path, *, ignore_term: bool = False) -> list[str]:
    trap = "trap '' TERM; " if ignore_term else ""
    return ["sh", "-c", f"{trap}sleep 300 & echo $$ $! > {tmp_path / 'pids.tmp'}; "
                        f"mv {tmp_path / 'pids.tmp'} {tmp_path / 'pids'}; wait"]


def stand_in_pids(tmp_path: Path) -> list[int]:
    wait_for(lambda: (tmp_path / "pids").exists(), "the stand-in never started")
    return [int(pid) for pid in (tmp_path / "pids").read_text().split()]


def wait_for(condition, message: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_an_engine_killed_takes_its_workers_with_it(tmp_path):
    # The API process is SIGKILLed, as the OOM killer does: its engine core must not stay.
    engine = ManagedEngine(EngineOptions(model=str(tmp_path)), tmp_path / "engine.log", command=stand_in(tmp_path))
    engine.start()
    api, worker = stand_in_pids(tmp_path)
    assert engine.exit_code is None and engine.pid == api  # the engine's API process, not its tether
    os.kill(api, signal.SIGKILL)
    wait_for(lambda: not _alive(worker), "the orphaned worker outlived its API process")
    wait_for(lambda: engine.exit_code is not None, "the tether did not report the engine's end")
    assert engine.exit_code == -signal.SIGKILL
    engine.stop()


STARTER = """
import sys, time
from pathlib import Path
from scanner_gateway.engine.launcher import EngineOptions, ManagedEngine
tmp = Path(sys.argv[1])
engine = ManagedEngine(EngineOptions(model=str(tmp)), tmp / "engine.log", command=sys.argv[2:], stop_grace_s=1)
engine.start()
time.sleep(300)
"""


@pytest.mark.parametrize("ignore_term", [False, True])
def test_the_engine_dies_with_its_gateway_even_by_sigkill(tmp_path, ignore_term):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), *stand_in(tmp_path, ignore_term=ignore_term)])
    try:
        pids = stand_in_pids(tmp_path)
        assert all(_alive(pid) for pid in pids)
        starter.kill()  # nothing of the gateway runs after this: no handler, no finally
        starter.wait()
        wait_for(lambda: not any(map(_alive, pids)), "the engine outlived its gateway")
    finally:
        for pid in stand_in_pids(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stop_is_bounded_by_the_grace_even_for_an_engine_that_ignores_sigterm(tmp_path):
    engine = ManagedEngine(EngineOptions(model=str(tmp_path)), tmp_path / "engine.log",
                           command=stand_in(tmp_path, ignore_term=True), stop_grace_s=1)
    engine.start()
    pids = stand_in_pids(tmp_path)
    engine.stop()  # returns within stop_grace_s + TETHER_MARGIN_S, or kills the tether
    assert not any(map(_alive, pids))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_the_engine_exports_its_spans_where_the_gateway_does(monkeypatch):
    from scanner_gateway.engine.launcher import engine_env

    opts = EngineOptions(model="/models/m")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert "--otlp-traces-endpoint" not in engine_command(opts)  # off by default
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "scanner-gateway")
    cmd = engine_command(opts)
    assert cmd[cmd.index("--otlp-traces-endpoint") + 1] == "http://collector:4318/v1/traces"
    env = engine_env("/models/m")
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"  # vLLM's own default is gRPC
    assert env["OTEL_SERVICE_NAME"] == "vllm"  # not the gateway's name
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert "--otlp-traces-endpoint" not in engine_command(opts)


def test_tracing_samples_a_tenth_by_default_and_follows_the_standard_variables():
    from scanner_gateway.tracing import _default_sampler, tracing_requested

    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert "TraceIdRatioBased{0.1}" in _default_sampler({}).get_description()
    assert "TraceIdRatioBased{0.5}" in _default_sampler({"OTEL_TRACES_SAMPLER_ARG": "0.5"}).get_description()
    assert _default_sampler({"OTEL_TRACES_SAMPLER": "always_on"}) is None  # the SDK reads it


def test_span_server_attributes_name_the_host_and_port_never_the_url():
    from scanner_gateway.tracing import server_attributes

    signed = server_attributes("https://user:secret@cdn.example.com/shelf.jpg?X-Amz-Signature=abc")
    assert signed == {"server.address": "cdn.example.com", "server.port": 443}
    assert server_attributes("http://10.0.0.7:8000") == {"server.address": "10.0.0.7", "server.port": 8000}

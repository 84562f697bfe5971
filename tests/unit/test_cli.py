import socket

import pytest
from PIL import Image
from typer.testing import CliRunner

from scanner_gateway import cli
from scanner_gateway.cli import app
from scanner_gateway.engine.launcher import port_taken
from tests.helpers import free_port

runner = CliRunner()


def test_tasks_lists_the_five_and_rejects_a_bad_dir(tmp_path):
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0
    assert sum(name in result.output for name in ("product_scan", "shelf_audit", "price_tags",
                                                   "storefront", "kitchen_compliance")) == 5
    (tmp_path / "bad.yaml").write_text("name: bad\n")
    result = runner.invoke(app, ["tasks", "--prompts-dir", str(tmp_path)])
    assert result.exit_code == 2


def test_sample_photo(tmp_path):
    path = tmp_path / "shelf.jpg"
    result = runner.invoke(app, ["sample-photo", str(path), "--width", "640", "--height", "480"])
    assert result.exit_code == 0
    assert Image.open(path).size == (640, 480)


def test_engine_command_prints_the_flags_the_gateway_relies_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANNER_CACHE_DIR", str(tmp_path))
    result = runner.invoke(app, ["engine", "--dry-run", "--host", "0.0.0.0", "--model", "/models/ostrakon"])
    assert result.exit_code == 0, result.output
    cmd = result.output.strip()
    assert cmd.startswith("vllm serve /models/ostrakon --served-model-name ostrakon-vl --host 0.0.0.0")
    for flag in ("--scheduling-policy priority", "--generation-config vllm", '"backend":"guidance"',
                 "--limit-mm-per-prompt"):
        assert flag in cmd


class EngineStandIn:
    """Stands in for the managed vLLM child: `up` is only asked where the gateway listens."""

    started: list["EngineStandIn"] = []

    def __init__(self, opts, log_path, stop_grace_s) -> None:
        self.opts, self.stop_grace_s = opts, stop_grace_s
        self.started.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def wait_healthy(self, on_wait=None) -> None:
        pass


@pytest.mark.parametrize(("env", "args", "where"), [
    ({}, [], ("127.0.0.1", 8080)),
    ({"SCANNER_HOST": "0.0.0.0", "SCANNER_PORT": "8090"}, [], ("0.0.0.0", 8090)),  # as `serve` reads them
    ({"SCANNER_PORT": "8090"}, ["--port", "8091"], ("127.0.0.1", 8091)),  # the flag wins
])
def test_up_listens_where_the_environment_or_the_flags_say(tmp_path, monkeypatch, env, args, where):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    monkeypatch.setattr(cli, "ManagedEngine", EngineStandIn)
    monkeypatch.setattr(cli, "_run_gateway", lambda settings: started.append(settings))
    monkeypatch.setattr(cli, "port_taken", lambda *_: False)  # whatever this machine runs on 8000/8080
    result = runner.invoke(app, ["up", "--model", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert (started[0].host, started[0].port) == where
    assert str(started[0].upstream_url).startswith("http://127.0.0.1:")


def test_up_keys_its_engine_and_stops_within_a_supervisors_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    monkeypatch.setattr(cli, "ManagedEngine", EngineStandIn)
    monkeypatch.setattr(cli, "port_taken", lambda *_: False)
    runs = []
    monkeypatch.setattr(cli, "_run_gateway", lambda settings: runs.append((settings, EngineStandIn.started[-1])))
    assert runner.invoke(app, ["up", "--model", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["up", "--model", str(tmp_path)]).exit_code == 0
    (first, engine), (second, _) = runs
    # Only the gateway holds the engine's key, a new one each run.
    assert engine.opts.api_key and first.upstream_api_key == engine.opts.api_key != second.upstream_api_key
    assert first.drain_s + first.graceful_timeout_s + engine.stop_grace_s < cli.UP_STOP_BOUND_S
    monkeypatch.setenv("SCANNER_DRAIN_S", "20")  # the operator's own choice still wins
    monkeypatch.setenv("SCANNER_UPSTREAM_API_KEY", "theirs")
    assert runner.invoke(app, ["up", "--model", str(tmp_path)]).exit_code == 0
    assert runs[-1][0].drain_s == 20 and runs[-1][1].opts.api_key == "theirs"
    refused = runner.invoke(app, ["up", "--model", str(tmp_path), "--engine-arg=--allowed-local-media-path=/"])
    assert refused.exit_code == 2 and "SCANNER_IMAGE_URL_HOSTS" in refused.output


def test_version():
    from scanner_gateway import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"scanner-gateway {__version__}\n"


@pytest.mark.parametrize("which", ["engine", "gateway"])
def test_up_refuses_a_taken_port_before_starting_the_engine(which, monkeypatch):
    monkeypatch.setattr(cli.signal, "signal", lambda *_: None)  # `up` hooks SIGTERM: not in a test run
    monkeypatch.setattr(cli, "ManagedEngine", None)  # any attempt to start vLLM fails loudly
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        free = free_port()
        ports = ["--engine-port", str(taken), "--port", str(free)] if which == "engine" else \
            ["--engine-port", str(free), "--port", str(taken)]
        result = runner.invoke(app, ["up", *ports])
        assert result.exit_code == 1, result.output
        assert f"port {taken} (the {which}'s) is already in use" in " ".join(result.output.split())
    assert not port_taken("127.0.0.1", taken)  # closed: free again

import json
import os
import signal
import time

from scanner_gateway.engine.launcher import EngineOptions, ManagedEngine, engine_command, engine_env


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


def test_stop_ends_the_workers_of_an_engine_that_was_killed(tmp_path):
    # A stand-in process tree for `vllm serve`: the API process (a shell) and an engine-core
    # child in its process group. The API process is SIGKILLed, as the OOM killer does.
    pidfile = tmp_path / "worker.pid"
    engine = ManagedEngine(EngineOptions(model=str(tmp_path)), tmp_path / "engine.log",
                           command=["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
    engine.start()
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    assert engine.exit_code is None
    os.kill(engine._proc.pid, signal.SIGKILL)
    while engine.exit_code is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.exit_code == -signal.SIGKILL
    assert _alive(worker)  # orphaned, still holding its memory
    engine.stop()
    deadline = time.monotonic() + 10
    while _alive(worker):
        assert time.monotonic() < deadline, "the orphaned worker outlived stop()"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False

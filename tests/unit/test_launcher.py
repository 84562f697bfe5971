import json

from scanner_gateway.engine.launcher import EngineOptions, engine_command, engine_env


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

"""The engine bench/compare.py starts: the gateway's flags, the bench's, then the caller's."""

from __future__ import annotations

import json

from bench import scan_load
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.engine.launcher import engine_command
from scanner_gateway.scan.tasks import TaskRegistry


def test_a_gpu_run_adds_its_flags_to_the_bench_engine_not_a_second_command_line():
    registry = TaskRegistry.load(default_prompts_dir())
    task = registry.get("product_scan")
    cmd = engine_command(scan_load.bench_engine_options("/models/8b", registry, task,
                                                      ["--load-format", "dummy"]))
    assert cmd[:3] == ["vllm", "serve", "/models/8b"]
    assert "--structured-outputs-config" in cmd and "--scheduling-policy" in cmd  # the gateway's own
    budget = json.loads(cmd[cmd.index("--mm-processor-kwargs") + 1])
    assert budget == {"size": {"longest_edge": task.budget.max_pixels, "shortest_edge": task.budget.min_pixels}}
    assert "--no-enable-prefix-caching" in cmd and cmd[cmd.index("--mm-processor-cache-gb") + 1] == "0"
    assert cmd[-2:] == ["--load-format", "dummy"]

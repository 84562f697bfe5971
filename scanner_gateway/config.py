"""Gateway settings: one class, read once at startup (env prefix SCANNER_)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, HttpUrl, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scanner_gateway.admission import PriorityClass
from scanner_gateway.scan.image_urls import DEFAULT_MAX_ACTIVE_FETCHES
from scanner_gateway.upstream.discovery import DnsUpstream, is_dns_upstream, parse_dns_server
from scanner_gateway.upstream.pool import DEFAULT_QUEUE_ALLOWANCE, DEFAULT_SATURATION_KV
from scanner_gateway.upstream.relay_media import MEDIA_KINDS
from scanner_gateway.upstream.routing import PolicyName
from scanner_gateway.urls import root_url

# Generation on a busy engine takes minutes; HTTP clients' defaults (5 s) are far too short.
DEFAULT_ENGINE_READ_TIMEOUT_S = 120.0
DEFAULT_ENGINE_CONNECT_TIMEOUT_S = 3.0
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 64 MP admits every phone camera (48 MP sensors included) and refuses pixel bombs.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# Decode threads when SCANNER_IMAGE_WORKERS is 0: one per usable CPU, but no more than
# this on a many-core node, as each holds a decoded photo in memory.
MAX_AUTO_IMAGE_WORKERS = 8
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def default_data_dir() -> Path:
    """Beside the user's other application data (XDG); the container images set /data."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scanner-gateway"


def default_prompts_dir() -> Path:
    """The shipped tasks: inside the installed package, or prompts/ of a checkout (an
    editable install maps the package there without copying it)."""
    package = Path(__file__).resolve().parent
    installed = package / "prompts"
    return installed if installed.is_dir() else package.parent / "prompts"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCANNER_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)

    upstream_url: HttpUrl = Field(
        HttpUrl("http://127.0.0.1:8000"),
        description="Base URL of the vLLM server (no /v1); SCANNER_UPSTREAMS overrides it.",
    )
    upstreams: str = Field(
        "", description="Comma-separated base URLs of several vLLM replicas (one pool); "
        "dns+http://NAME:PORT stands for every A/AAAA record of NAME (a headless Service).",
    )
    discovery_interval_s: float = Field(
        1.0, gt=0, description="How often dns+ upstreams are looked up again (replicas join and leave)."
    )
    dns_server: str | None = Field(
        None, description="Nameserver (HOST or HOST:PORT) for dns+ upstreams; unset: the system's."
    )
    routing: PolicyName = Field("least_loaded", description="least_loaded or round_robin.")
    probe_interval_s: float = Field(
        1.0, gt=0, description="How often each replica's /health and /metrics are read."
    )
    upstream_attempts: int = Field(
        3, ge=1, description="Replicas tried per request when one cannot be reached."
    )
    upstream_api_key: str | None = Field(
        None, description="Key the gateway sends to vLLM (`vllm serve --api-key`)."
    )
    model: str | None = Field(
        None, description="Served model name; discovered from the engine's /v1/models if unset."
    )
    engine_connect_timeout_s: float = Field(DEFAULT_ENGINE_CONNECT_TIMEOUT_S, gt=0)
    engine_read_timeout_s: float = Field(DEFAULT_ENGINE_READ_TIMEOUT_S, gt=0)
    engine_max_connections: int = Field(512, ge=1)

    max_in_flight_per_replica: int = Field(
        0, ge=0, description="Requests the gateway lets run at once, per configured replica, at most; "
        "0: no fixed cap, admit while the engines are not saturated (their gauges say).",
    )
    engine_queue_allowance: int = Field(
        DEFAULT_QUEUE_ALLOWANCE, ge=0, description="Requests the gateway lets wait inside a full "
        "engine (vllm:num_requests_waiting as last read, plus what was sent since); more wait in "
        "the gateway's priority queue. 0: send only into a free seat.",
    )
    engine_saturation_kv: float = Field(
        DEFAULT_SATURATION_KV, gt=0, le=1, description="An engine whose KV cache is this full "
        "(vllm:kv_cache_usage_perc) is saturated.",
    )
    queue_limit: int = Field(256, ge=0, description="Requests allowed to wait for a slot; more get 429.")
    max_queue_wait_s: float = Field(
        10.0, ge=0, description="Longest wait for a slot; a request expected to wait longer gets 429 at once."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of a whole scan (504 after).")
    scan_priority: PriorityClass = Field(
        "interactive", description="Class of /v1/scan and scan/<task> requests without an X-Priority header."
    )
    chat_priority: PriorityClass = Field(
        "batch", description="Class of relayed chat requests without an X-Priority header."
    )
    engine_priorities: dict[PriorityClass, int] | None = Field(
        default_factory=lambda: {"interactive": 0, "batch": 10},
        description="vLLM `priority` sent per class (lower runs first; needs `vllm serve "
        "--scheduling-policy priority`); null sends none.",
    )
    idempotency_ttl_s: float = Field(600.0, gt=0, description="How long an Idempotency-Key's result is kept.")
    idempotency_max_keys: int = Field(10_000, ge=1, description="Idempotency keys kept at most (oldest dropped).")

    data_dir: Path = Field(
        default_factory=default_data_dir, description="Batch files (uploads, outputs) and, without "
        "SCANNER_DATABASE_URL, the SQLite database of batches; a volume every gateway process shares.",
    )
    database_url: str | None = Field(
        None, description="Where batches are kept: postgresql://user:pass@host/db for several gateway "
        "pods (needs the `postgres` extra), or sqlite:///path; unset: SQLite in SCANNER_DATA_DIR.",
    )
    batch_max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest upload to POST /v1/files.")
    batch_upload_timeout_s: float = Field(
        1800.0, gt=0, description="Time a client has to send a whole batch file upload (408 after).")
    batch_max_items: int = Field(50_000, ge=1, description="Requests one batch may hold.")
    batch_max_in_flight: int = Field(
        4, ge=1, description="Batch items each gateway process runs at once (its bounded share of "
        "the engines; each still waits for admission behind every interactive request).",
    )
    batch_lease_s: float = Field(
        60.0, gt=0, description="How long a worker holds an item without renewing: an item of a "
        "gateway that died is taken up again after this.",
    )
    batch_poll_s: float = Field(1.0, gt=0, description="How often workers look for items other processes added.")
    batch_max_attempts: int = Field(
        3, ge=1, description="Tries per item on an engine error (502/503/504) or a worker that died with it.",
    )

    prompts_dir: Path = Field(default_factory=default_prompts_dir)
    default_locale: Literal["zh", "en"] = Field(
        "zh", description="Prompt language when a request names none (the model is zh-first)."
    )

    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1024)
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    max_request_bytes: int = Field(
        0, ge=0, description="Whole-request cap; 0 means max images x max_image_bytes x 4/3 + 1 MiB."
    )
    max_buffered_bytes: int = Field(
        512 * 1024 * 1024, ge=0, description="Request bodies all requests together may hold at once "
        "(429 overloaded beyond; never below one request's cap): a burst of large uploads then cannot "
        "take the gateway past its memory limit (1 GiB in deploy/k8s). Shared among --workers.",
    )
    body_timeout_s: float = Field(
        120.0, gt=0, description="Time a client has to send its whole request body (408 after): "
        "a 5 MB photo over a 1 Mbit/s shop uplink takes ~40 s; a stalled or trickling upload "
        "does not hold its connection and buffer for ever.",
    )
    image_url_hosts: str = Field(
        "", description="Comma-separated hosts (fnmatch patterns, e.g. *.s3.amazonaws.com) whose "
        "http(s) image URLs scans may name; empty = image URLs refused (the gateway fetches nothing)."
    )
    relay_media_kinds: str = Field(
        "image", description="Comma-separated media kinds relayed OpenAI requests may carry: image, "
        "video, audio, file, embeds. The product serves images; the rest get 400 unless listed here."
    )
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Overall limit of one image URL fetch.")
    image_fetch_max_active: int = Field(
        DEFAULT_MAX_ACTIVE_FETCHES, ge=1,
        description="Image URL downloads at once (each buffers up to max_image_bytes); more get 429.",
    )
    image_workers: int = Field(
        0, ge=0, description="Threads that decode and resize images; 0: one per CPU this process "
        f"may use (a cgroup CPU limit counted), at most {MAX_AUTO_IMAGE_WORKERS}.",
    )
    image_queue_limit: int = Field(
        0, ge=0, description="Images allowed to wait for a decode thread before answering 429; 0: all "
        "that admitted scans can bring (in-flight cap x replicas x a task's most images), so a scan "
        "admission let in is never refused here.",
    )
    jpeg_quality: int = Field(85, ge=30, le=100)
    api_keys: str = Field(
        "", description="Comma-separated client keys; empty (and no keys file) = auth off."
    )
    api_keys_file: Path | None = Field(None, description="File with one client key per line.")
    metrics_need_key: bool = Field(
        False, description="With API keys on, /metrics needs a key too (the scraper sends one)."
    )
    max_in_flight_per_key: int = Field(
        0, ge=0, description="Scan and completion requests one API key may have open at once (more get "
        "429 key_over_limit), so one store's runaway client cannot fill the queue for all; 0 = no limit. "
        "Needs API keys."
    )
    cors_origins: str = Field(
        "", description="Comma-separated browser origins (e.g. https://ops.example.com, or *) allowed "
        "to call the API from their pages; empty = no CORS headers (same-origin only, like the scan page)."
    )
    drain_s: float = Field(
        5.0, ge=0, description="On SIGTERM, report not-ready this long (still serving) before stopping."
    )
    graceful_timeout_s: float = Field(30.0, ge=0, description="Then wait this long for in-flight requests.")
    access_log: bool = Field(True, description="One log line per request (uvicorn's access log).")
    raw_output_in_errors: int = Field(
        500, ge=0, description="Characters of the model's raw text kept in 502 errors."
    )

    def as_env(self) -> dict[str, str]:
        """These settings as SCANNER_* variables (for worker processes to read back)."""
        env = {}
        for name, value in self.model_dump(mode="json", exclude_none=True).items():
            env[f"SCANNER_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        return env

    def for_one_of(self, workers: int) -> Settings:
        """The settings of one of `workers` processes: each admits its share of the
        in-flight cap, of the queue, of each key's limit and of the body memory, so the
        engines (and keys, and the pod's memory) see the caps the operator set (not
        workers x cap). Rounded down, at least one slot each."""
        return self.model_copy(update={
            "max_in_flight_per_replica": self.max_in_flight_per_replica
            and max(1, self.max_in_flight_per_replica // workers),
            "queue_limit": self.queue_limit // workers,
            "max_in_flight_per_key": self.max_in_flight_per_key and max(1, self.max_in_flight_per_key // workers),
            "max_buffered_bytes": self.max_buffered_bytes // workers,
        })

    def max_in_flight(self, replicas: int) -> int:
        """The admission's upper limit: the configured cap, else the engine connections
        (no more can be open anyway; saturation stops admission well before)."""
        if self.max_in_flight_per_replica:
            return self.max_in_flight_per_replica * replicas
        return self.engine_max_connections

    def image_worker_count(self) -> int:
        return self.image_workers or min(usable_cpus(), MAX_AUTO_IMAGE_WORKERS)

    @field_validator("upstreams")
    @classmethod
    def _upstreams_are_urls(cls, value: str) -> str:
        for url in _items(value):
            if is_dns_upstream(url):
                DnsUpstream.parse(url)  # its ValueError says what is wrong
                continue
            try:
                HttpUrl(url)
            except ValidationError:
                raise ValueError(f"{url!r} is not an http(s) URL (or dns+http://NAME:PORT)") from None
        return value

    @field_validator("dns_server")
    @classmethod
    def _dns_server_is_an_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_dns_server(value)
        return value

    def upstream_urls(self) -> list[str]:
        """The replicas named by URL (SCANNER_UPSTREAM_URL when SCANNER_UPSTREAMS is empty)."""
        specs = _items(self.upstreams)
        if not specs:
            return [root_url(str(self.upstream_url))]
        return [root_url(str(HttpUrl(u))) for u in specs if not is_dns_upstream(u)]

    def upstream_names(self) -> list[DnsUpstream]:
        """The dns+ upstreams: their replicas are found by looking the names up."""
        return [DnsUpstream.parse(u) for u in _items(self.upstreams) if is_dns_upstream(u)]

    @field_validator("relay_media_kinds")
    @classmethod
    def _known_media_kinds(cls, value: str) -> str:
        unknown = set(_split(value)) - set(MEDIA_KINDS)
        if unknown:
            raise ValueError(f"unknown media kind(s) {sorted(unknown)}; known: {', '.join(MEDIA_KINDS)}")
        return value

    def relay_media_kind_set(self) -> frozenset[str]:
        return frozenset(_split(self.relay_media_kinds))

    def image_url_host_patterns(self) -> list[str]:
        return [h.strip() for h in self.image_url_hosts.split(",") if h.strip()]

    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def client_keys(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        return keys


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _split(value: str) -> list[str]:
    return [item.strip().lower() for item in value.split(",") if item.strip()]


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per bad setting, named as the operator set it (SCANNER_<NAME>), for a
    startup message instead of a traceback. Values of key settings are not repeated."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = f"SCANNER_{field.upper()}" if field else "settings"
        shown = "" if "key" in field or "input" not in error else f" (got {error['input']!r})"
        lines.append(f"{name}: {error['msg'].removeprefix('Value error, ')}{shown}")
    return lines


def usable_cpus(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity (where the platform tells), bounded by
    its cgroup's CPU quota (a Kubernetes CPU limit), which the affinity does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota file, or one we cannot read
        pass
    return cpus

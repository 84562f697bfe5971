"""Prometheus metrics, all named `scanner_*` (never an engine metric's name).

One `GatewayMetrics` per app, holding its own registry (tests build many apps). With
several worker processes set `PROMETHEUS_MULTIPROC_DIR` (an empty directory shared by
the workers; `scanner-gateway serve --workers N` sets one up): every worker writes its
samples there and `/metrics` on any worker reports them all, summed (gauges: summed
for in-flight and queue depth, last value written for replica state). A worker that
died without a clean exit is noticed at the next scrape and its in-flight and queue
gauges stop counting.

GPU utilisation and memory come from NVML (`nvidia-ml-py`) when a GPU is visible to the
gateway (e.g. the gateway runs beside the engine); without one they are simply absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scanner_gateway import __version__

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
BYTES_BUCKETS = tuple(2.0**p for p in range(10, 26, 2))  # 1 KiB .. 32 MiB
PIXEL_BUCKETS = (1e5, 3e5, 1e6, 2e6, 4e6, 8e6, 12e6, 24e6, 48e6, 64e6)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def forget_dead_workers(directory: str) -> None:
    """Drop the live-summed gauges of worker processes that are gone.

    A crashed worker (OOM-killed, segfault) never runs its shutdown, and its last
    in-flight and queue values would otherwise be summed into every scrape forever.
    """
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)


class GpuCollector(Collector):
    """GPU utilisation and memory through NVML; yields nothing where NVML is unavailable."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no driver, no GPU, no package: the metrics are just absent
            log.debug("NVML unavailable; no GPU metrics")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            return
        nvml = self._nvml
        util = GaugeMetricFamily("scanner_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"])
        used = GaugeMetricFamily("scanner_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu"])
        total = GaugeMetricFamily("scanner_gpu_memory_total_bytes", "GPU memory size (NVML).", labels=["gpu"])
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(i)], rates.gpu / 100.0)
                used.add_metric([str(i)], float(memory.used))
                total.add_metric([str(i)], float(memory.total))
        except Exception as exc:  # a GPU that vanished must not break /metrics
            log.warning("NVML read failed: %s", exc)
            return
        yield from (util, used, total)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("scanner_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            "scanner_request_duration_seconds", "Time to the end of the response.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.scans = Counter("scanner_scans", "Scans finished, by task and outcome (error code or ok).",
                             ["task", "outcome"], registry=r)
        self.preprocess_seconds = Histogram("scanner_preprocess_duration_seconds", "Image normalisation per scan.",
                                            ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_seconds = Histogram("scanner_engine_duration_seconds", "Engine time per scan (retries included).",
                                        ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.output_failures = Counter("scanner_structured_output_failures",
                                       "Engine answers that were cut or failed validation.", ["task"], registry=r)
        self.scan_retries = Counter("scanner_scan_retries", "Scans asked again after an invalid answer.",
                                    ["task"], registry=r)
        self.upstream_retries = Counter("scanner_upstream_retries",
                                        "Requests retried on another replica.", registry=r)
        self.image_bytes = Histogram("scanner_image_bytes", "Size of received photos.", buckets=BYTES_BUCKETS,
                                     registry=r)
        self.image_pixels = Histogram("scanner_image_pixels", "Pixels of received photos.", buckets=PIXEL_BUCKETS,
                                      registry=r)
        self.loop_lag = Histogram("scanner_event_loop_lag_seconds",
                                  "How late the event loop's timers fire (a blocked or CPU-starved gateway).",
                                  buckets=LOOP_LAG_BUCKETS, registry=r)
        self.in_flight = Gauge("scanner_admission_in_flight", "Requests holding an admission slot.",
                               multiprocess_mode="livesum", registry=r)
        self.queued = Gauge("scanner_admission_queue_depth", "Requests waiting for a slot.", ["priority"],
                            multiprocess_mode="livesum", registry=r)
        self.rejections = Counter("scanner_admission_rejections", "Requests refused with 429.", ["priority"],
                                  registry=r)
        self.client_limit_rejections = Counter(
            "scanner_client_limit_rejections", "Requests refused with 429 because their API key had "
            "SCANNER_MAX_IN_FLIGHT_PER_KEY requests open.", registry=r)
        self.replica_healthy = Gauge("scanner_replica_healthy", "1 if the replica is routable.", ["replica"],
                                     multiprocess_mode="mostrecent", registry=r)
        self.replica_in_flight = Gauge("scanner_replica_in_flight", "Requests open on the replica.", ["replica"],
                                       multiprocess_mode="livesum", registry=r)
        self.replica_waiting = Gauge("scanner_replica_engine_waiting",
                                     "The engine's waiting queue at the last scrape.", ["replica"],
                                     multiprocess_mode="mostrecent", registry=r)
        self.replica_running = Gauge("scanner_replica_engine_running",
                                     "The engine's running requests at the last scrape.", ["replica"],
                                     multiprocess_mode="mostrecent", registry=r)
        self.replica_kv_usage = Gauge("scanner_replica_engine_kv_cache_usage_ratio",
                                      "The engine's KV-cache usage at the last scrape.", ["replica"],
                                      multiprocess_mode="mostrecent", registry=r)
        self.discovery_failures = Counter(
            "scanner_discovery_failures", "DNS lookups of a dns+ upstream that failed (the replicas "
            "last found are kept meanwhile).", ["name"], registry=r)
        self.batch_items = Counter(
            "scanner_batch_items", "Batch items this process worked, by outcome (done, failed: stored; "
            "deferred: put back on a 429; retried: put back after an engine error).", ["outcome"], registry=r)
        # Read from the database, the same figure in every process and pod: take the max, not the sum.
        self.batch_item_states = Gauge("scanner_batch_item_states", "Batch items in the database by state.",
                                       ["state"], multiprocess_mode="mostrecent", registry=r)
        # Which release answers (dashboards, rollouts): Info metrics do not work across workers.
        Gauge("scanner_build_info", "The gateway's version; always 1.", ["version"],
              multiprocess_mode="max", registry=r).labels(__version__).set(1)
        self._gpu = GpuCollector()
        if multiprocess_dir() is None:
            r.register(self._gpu)

    def forget_replica(self, url: str) -> None:
        """A replica that left the pool: its series read 0, then go (in one process; with
        several workers the files keep the 0)."""
        for gauge in (self.replica_healthy, self.replica_in_flight, self.replica_waiting,
                      self.replica_running, self.replica_kv_usage):
            gauge.labels(url).set(0)
            with contextlib.suppress(KeyError):
                gauge.remove(url)

    def render(self) -> tuple[bytes, str]:
        """The exposition text, from every worker in multiprocess mode."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        forget_dead_workers(directory)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, directory)
        merged.register(self._gpu)
        return generate_latest(merged), CONTENT_TYPE_LATEST

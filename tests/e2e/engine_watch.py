"""What the real engine did, read from its own /metrics, and a way to keep it busy.

Tests run one at a time against the session's engine, so a counter's change across a
test is that test's doing. Every wait polls with a generous deadline (a 2-core CI box
runs vLLM, the gateway and the test at once).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import httpx

from scanner_gateway.cli import DEV_MAX_NUM_SEQS
from scanner_gateway.engine.launcher import DEV_SERVED_NAME

T = TypeVar("T")
DEADLINE_S = 120.0
# A held generation's length: minutes even at the dev engine's best rate (a single
# sequence, a short context), so it runs until the test lets go, never ends on its own.
HELD_MAX_TOKENS = 1_000_000
# On 2 cores vLLM's busy engine processes starve its API server: /metrics may take seconds.
METRICS_TIMEOUT_S = 60.0


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples in Prometheus `text` whose labels include `labels` (0 if none)."""
    total = 0.0
    for label_text, value in re.findall(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def engine_metric(engine_url: str, name: str, **labels: str) -> float:
    return metric_sum(httpx.get(f"{engine_url}/metrics", timeout=METRICS_TIMEOUT_S).text, name, **labels)


def gateway_metric(gateway_url: str, name: str, **labels: str) -> float:
    return metric_sum(httpx.get(f"{gateway_url}/metrics", timeout=METRICS_TIMEOUT_S).text, name, **labels)


def finished(engine_url: str, reason: str | None = None) -> float:
    """Requests the engine has finished (`reason`: stop, length, ...; None: all; aborted requests are not counted)."""
    labels = {} if reason is None else {"finished_reason": reason}
    return engine_metric(engine_url, "vllm:request_success_total", **labels)


def running(engine_url: str) -> float:
    return engine_metric(engine_url, "vllm:num_requests_running")


def sent_to_engine(gateway_url: str) -> bool:
    """The gateway has a request open at its engine. (Asked of the gateway: the engine's
    own gauges answer late, if at all, while it generates on a 2-core box.)"""
    return gateway_metric(gateway_url, "scanner_replica_in_flight") >= 1


def wait_until(probe: Callable[[], T], what: str, deadline_s: float = DEADLINE_S) -> T:
    """Poll `probe` until it returns something truthy; that value."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


def wait_finished(engine_url: str, before: float, count: int, reason: str | None = None, idle: bool = True) -> None:
    """Until `count` more requests finished than `before`, then (once the engine is idle,
    unless the test keeps it busy: `idle=False`) check that no more did."""
    wait_until(lambda: finished(engine_url, reason) - before >= count, f"{count} engine request(s) finished")
    if idle:
        wait_idle(engine_url)
    assert finished(engine_url, reason) - before == count


def wait_idle(engine_url: str) -> None:
    wait_until(lambda: running(engine_url) == 0 and engine_metric(engine_url, "vllm:num_requests_waiting") == 0,
               "the engine is idle")


@contextmanager
def engine_held(gateway_url: str, engine_url: str, headers: dict[str, str] | None = None) -> Iterator[None]:
    """A relayed chat stream that runs until the block ends: it holds one of the gateway's
    admission slots (and a per-key place) and keeps the engine generating. Entered once
    its first chunk arrived; on exit the stream is closed (the engine aborts it) and both
    the gateway and the engine are idle again, so the next test counts only its own work."""
    # Unread, its ~2 KB chunks (20 logprobs each) fill the sockets' buffers long before it
    # ends, so the relay, and its slot, wait for this client however fast the engine is.
    body = {"model": DEV_SERVED_NAME, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": HELD_MAX_TOKENS, "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            chunks = r.iter_raw()  # kept: a dropped iterator closes the connection (httpcore)
            next(chunks)
            yield
    wait_until(lambda: gateway_metric(gateway_url, "scanner_admission_in_flight") == 0, "the gateway let go")
    wait_idle(engine_url)



@contextmanager
def engine_full(engine_url: str, seqs: int = DEV_MAX_NUM_SEQS) -> Iterator[None]:
    """The engine busy with `seqs` long generations sent to it directly: its batch is full
    (`--max-num-seqs`), so a request that reaches it meanwhile waits inside it, for as long
    as the block lasts. Entered once each generation has started; on exit they are dropped
    (vLLM aborts them, so they count in no finished total) and the engine is idle again."""
    body = {"model": DEV_SERVED_NAME, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": HELD_MAX_TOKENS, "ignore_eos": True, "stream": True}
    with ExitStack() as streams:
        client = streams.enter_context(httpx.Client(timeout=120))
        for _ in range(seqs):
            r = streams.enter_context(client.stream("POST", f"{engine_url}/v1/chat/completions", json=body))
            assert r.status_code == 200, r.read()
            chunks = r.iter_raw()
            streams.callback(chunks.close)
            next(chunks)  # its first token: it runs
        yield
    wait_idle(engine_url)

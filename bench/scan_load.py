"""The scan workload compare.py and ab.py share: the photos, the prompt, the engine the
bench starts, how each system is sent a scan, and the load loops."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import yaml

from bench.common import console, free_port
from scanner_gateway.cli import DEV_MAX_MODEL_LEN
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.engine.launcher import DEV_SERVED_NAME, EngineOptions, ManagedEngine
from scanner_gateway.scan.images import NormalizedImage, normalize_image
from scanner_gateway.scan.service import build_messages, build_payload
from scanner_gateway.scan.tasks import Task, TaskRegistry
from scanner_gateway.synthetic import shelf_jpeg

# The photos cycle, so vLLM's prefix and multimodal-processor caches would answer repeats
# (93% prefix hits, 100% processor hits, measured): a workload no store sends. Off, every
# request pays its image work, as with real, always-new photos.
CACHES_OFF = ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]


Send = Callable[[httpx.AsyncClient, int], Awaitable[int]]  # -> HTTP status


WARM_UP_REQUESTS, WARM_UP_CONCURRENCY = 8, 4  # every system alike; 4 at a time reaches each seed-after worker


@dataclass
class TokenTally:
    """Prompt and completion tokens of a system's answers, as it reports them (the
    gateway's and vLLM's `usage`, the seeds' own count): the same-budget claim, shown."""
    answers: int = 0
    prompt: int = 0
    completion: int = 0

    def add(self, usage: dict | None) -> None:
        if usage:
            self.answers += 1
            self.prompt += usage.get("prompt_tokens", 0)
            self.completion += usage.get("completion_tokens", 0)

    def reset(self) -> None:
        self.answers = self.prompt = self.completion = 0

    def means(self) -> tuple[float | None, float | None]:
        """Prompt and completion tokens per answer (None: no answer counted)."""
        if not self.answers:
            return None, None
        return self.prompt / self.answers, self.completion / self.answers


def warm_up(send: Send, requests: int = WARM_UP_REQUESTS, concurrency: int = WARM_UP_CONCURRENCY) -> None:
    """Requests not measured, so no system's first (cold) answers land in its figures."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=900) as client:
            async def worker(w: int) -> None:
                for i in range(w, requests, concurrency):
                    await send(client, i)
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
    asyncio.run(run())


async def closed_loop(send: Send, concurrency: int, seconds: float, timeout_s: float) -> tuple[list[float], int, float | None]:
    """Latencies (ms) of the 200s, errors, and the answers/s in the steady window.

    The steady window runs from the moment every client has had its first answer (the
    start-up ramp is over) to the end of the level; requests still running then finish
    and count in the latencies, not in the throughput. None: the window was too short
    or held fewer answers than clients.
    """
    latencies: list[float] = []
    answered_at: list[float] = []
    first_answer: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    ok = await send(client, i) == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if ok:
                    latencies.append((t1 - t0) * 1000)
                    answered_at.append(t1)
                else:
                    errors += 1
                if i == w:
                    first_answer.append(t1)
                i += concurrency
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    steady_from = max(first_answer) if len(first_answer) == concurrency else stop
    in_window = sum(steady_from < t <= stop for t in answered_at)
    # Fewer answers than clients in the window is too coarse a count to call a rate
    # (a slow engine on a short level can land none at all).
    if stop - steady_from < seconds / 4 or in_window < concurrency:
        return latencies, errors, None
    return latencies, errors, in_window / (stop - steady_from)


async def open_loop(send: Send, rate: float, seconds: float, timeout_s: float) -> tuple[Counter, list[float], float]:
    """Outcomes ("200", "429", "5xx", "timeout", "connection", "4xx") offering `rate`
    requests/s, the latencies (ms) of the 200s, and the seconds until the last outcome."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    answered: list[float] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def one(i: int) -> str:
            t0 = time.perf_counter()
            try:
                status = await send(client, i)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError:
                return "connection"
            if status == 200:
                answered.append((time.perf_counter() - t0) * 1000)
            return "200" if status == 200 else "429" if status == 429 else f"{status // 100}xx"
        tasks = []
        started = time.perf_counter()
        for i in range(max(1, int(rate * seconds))):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        outcomes = Counter(await asyncio.gather(*tasks))
        return outcomes, answered, time.perf_counter() - started


RESOLUTIONS = [(1024, 768), (1600, 1200), (2000, 1500)]


SCAN_FORM = {"task": "product_scan", "locale": "en"}


def photo_sets(task: Task, photos: int) -> tuple[list[NormalizedImage], list[bytes]]:
    """`photos` distinct shelf photos at three resolutions, already sized to the task's
    budget, and as many distinct 12 MP ones (vLLM's encoder cache must find no repeat)."""
    raw = [shelf_jpeg(*RESOLUTIONS[i % 3], seed=5000 + i) for i in range(photos)]
    sized = [normalize_image(p, task.budget, max_bytes=2**26, max_pixels=10**8) for p in raw]
    return sized, [shelf_jpeg(4000, 3000, seed=9000 + i) for i in range(photos)]


def bench_engine_options(model_dir: str, registry: TaskRegistry, task: Task,
                         extra_args: Sequence[str] = ()) -> EngineOptions:
    """vLLM on `model_dir` as the bench runs it: the gateway's own flags, the task's budget
    applied server-side (for raw photos sent straight to it), its prefix and processor
    caches off, then `extra_args` (a GPU run's `--load-format dummy`, say)."""
    return EngineOptions(model=model_dir, served_model_name=DEV_SERVED_NAME, port=free_port(),
                         max_images=registry.most_images(),
                         max_image_pixels=max(t.spec.pixel_budget.max_pixels for t in registry),
                         max_model_len=DEV_MAX_MODEL_LEN,
                         extra_args=["--mm-processor-kwargs", json.dumps(server_side_budget(task)), *CACHES_OFF,
                                     *extra_args])


def start_engine(model_dir: str, registry: TaskRegistry, task: Task, extra_args: Sequence[str] = ()) -> ManagedEngine:
    engine = ManagedEngine(bench_engine_options(model_dir, registry, task, extra_args),
                           Path(tempfile.mkdtemp()) / "vllm.log")
    console.print(f"starting vLLM ... (log: {engine.log_path})")
    engine.start()
    engine.wait_healthy(900)
    return engine


def multipart(url: str, pictures: list[bytes], extra: dict, tally: TokenTally | None = None) -> Send:
    """POST each photo in turn as a multipart upload (the gateway's and the seeds' API)."""
    async def send(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(url, files={"image": ("shelf.jpg", pictures[i % len(pictures)], "image/jpeg")},
                              data=extra)
        if tally is not None and r.status_code == 200:
            tally.add(r.json().get("usage"))
        return r.status_code
    return send


def direct_sender(engine_url: str, task: Task, served: str, sized: list[NormalizedImage], finish: Counter,
                  tally: TokenTally | None = None) -> Send:
    """The gateway's own prompt and sized photo straight to vLLM; its finish reasons are
    counted ("length": a JSON cut off, which vllm-direct still counts as an answer)."""
    async def send(client: httpx.AsyncClient, i: int) -> int:
        payload = build_payload(task, served, build_messages(task, [sized[i % len(sized)]], "en"), 1,
                                task.spec.sampling.max_tokens)
        r = await client.post(f"{engine_url}/v1/chat/completions", json=payload)
        if r.status_code == 200:
            answer = r.json()
            finish[answer["choices"][0]["finish_reason"]] += 1
            if tally is not None:
                tally.add(answer.get("usage"))
        return r.status_code
    return send


def raw_direct_sender(engine_url: str, task: Task, served: str, photos: list[bytes],
                      tally: TokenTally | None = None) -> Send:
    """Raw photos straight to vLLM. The bodies are built once, so the load generator
    spends no CPU per request on base64 and JSON."""
    bodies = [json.dumps(build_payload(task, served, build_messages(task, [raw_image(photo)], "en"), 1,
                                       task.spec.sampling.max_tokens)).encode() for photo in photos]

    async def send(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(f"{engine_url}/v1/chat/completions", content=bodies[i % len(bodies)],
                              headers={"content-type": "application/json"})
        if tally is not None and r.status_code == 200:
            tally.add(r.json().get("usage"))
        return r.status_code
    return send


def capped_prompts(max_items: int) -> Path:
    """A copy of prompts/ whose product_scan arrays hold at most `max_items` (never fewer
    than their minItems: a box stays four numbers)."""
    copy = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    for path in default_prompts_dir().glob("*.yaml"):
        shutil.copy(path, copy / path.name)
    spec = yaml.safe_load((copy / "product_scan.yaml").read_text())

    def cap(node: object) -> None:
        if isinstance(node, dict):
            if "maxItems" in node:
                node["maxItems"] = max(node.get("minItems", 0), min(node["maxItems"], max_items))
            for child in node.values():
                cap(child)
        elif isinstance(node, list):
            for child in node:
                cap(child)

    cap(spec["result_schema"])
    (copy / "product_scan.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return copy


def server_side_budget(task: Task) -> dict:
    """vLLM's `--mm-processor-kwargs` for the task's pixel budget: Qwen-VL processors read
    `size` as pixel counts (longest_edge = max pixels, shortest_edge = min pixels)."""
    budget = task.budget
    return {"size": {"longest_edge": budget.max_pixels, "shortest_edge": budget.min_pixels}}


def raw_image(photo: bytes) -> SimpleNamespace:
    """A photo as is, where build_messages takes a normalised one (only its data URL is used)."""
    return SimpleNamespace(data_url="data:image/jpeg;base64," + base64.b64encode(photo).decode())

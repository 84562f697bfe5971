"""ScanService: photo(s) + task -> validated, typed ScanResult, via one vLLM call."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from scanner_gateway.admission import PRIORITY_CLASSES, AdmissionController, PriorityClass
from scanner_gateway.concurrency import all_or_first_error
from scanner_gateway.errors import (
    ClientClosedRequest,
    GatewayError,
    InvalidRequest,
    ModelOutputInvalid,
    Overloaded,
    UpstreamTimeout,
)
from scanner_gateway.protocol import ChatCompletion
from scanner_gateway.scan.idempotency import IdempotencyCache, request_fingerprint
from scanner_gateway.scan.image_urls import ImageFetcher, is_image_url
from scanner_gateway.scan.images import ImageNormalizer, NormalizedImage
from scanner_gateway.scan.postprocess import OutputInvalid, build_result, parse_output
from scanner_gateway.scan.results import ImageInfo, ScanResult, ScanTimings, ScanUsage
from scanner_gateway.scan.tasks import Locale, Task, TaskRegistry
from scanner_gateway.tracing import TRACER
from scanner_gateway.upstream.pool import ReplicaPool

if TYPE_CHECKING:  # the metrics are passed in: the domain does not load prometheus_client
    from scanner_gateway.metrics import GatewayMetrics

# A truncated or invalid answer is retried once with this much more room.
RETRY_TOKEN_FACTOR = 2
# The `task` label of scans refused before their body (which names the task) was read.
UNREAD_TASK = "(unread)"


def build_messages(task: Task, images: Sequence[NormalizedImage], locale: Locale) -> list[dict[str, Any]]:
    system, user = task.render(locale, len(images))
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": img.data_url}} for img in images
    ]
    parts.append({"type": "text", "text": user})
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


def build_payload(
    task: Task, model: str, messages: list[dict[str, Any]], image_count: int, max_tokens: int
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "temperature": task.spec.sampling.temperature,
        "max_tokens": max_tokens,
        # response_format is what current vLLM honours (guided_* fields are ignored).
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": task.name,
                "schema": task.engine_schema(image_count),
                "strict": True,
            },
        },
    }


class ScanService:
    def __init__(
        self,
        registry: TaskRegistry,
        normalizer: ImageNormalizer,
        engine: ReplicaPool,
        admission: AdmissionController,
        *,
        default_locale: Locale = "zh",
        raw_output_chars: int = 500,
        engine_priorities: Mapping[PriorityClass, int] | None = None,
        request_timeout_s: float = 300.0,
        idempotency: IdempotencyCache | None = None,
        metrics: GatewayMetrics | None = None,
        image_fetcher: ImageFetcher | None = None,
    ) -> None:
        self.registry = registry
        self.normalizer = normalizer
        self.engine = engine
        self.admission = admission
        self.default_locale = default_locale
        self.raw_output_chars = raw_output_chars
        # None: the engine runs without --scheduling-policy priority; send no priority.
        self.engine_priorities = engine_priorities
        self.request_timeout_s = request_timeout_s
        # Not `or`: an empty cache is falsy (it has a length).
        self.idempotency = idempotency if idempotency is not None else IdempotencyCache()
        if metrics is None:  # a service of its own (tests, scripts): its own registry
            from scanner_gateway.metrics import GatewayMetrics

            metrics = GatewayMetrics()
        self.metrics = metrics
        # None: image URLs are refused (SCANNER_IMAGE_URL_HOSTS unset).
        self.image_fetcher = image_fetcher

    def refuse_early_if_overloaded(self) -> None:
        """The 429 a scan would get anyway, raised before its body is read: under a burst
        of phone photos, reading and parsing megabytes only to refuse them is what slowed
        the gateway. Checked for the first priority class, which the body may yet name."""
        try:
            self.admission.check(PRIORITY_CLASSES[0])
        except Overloaded:
            self.metrics.scans.labels(UNREAD_TASK, Overloaded.code).inc()
            raise

    async def _downloaded(
        self, task: Task, images: Sequence[bytes | str], priority: PriorityClass, deadline: float
    ) -> Sequence[bytes | str]:
        """The photos (their number checked), image URLs fetched. Before the scan asks
        for its slot, so that a slow image host holds no slot the engine could use; an
        overloaded gateway still refuses before downloading anything."""
        if not images:
            raise InvalidRequest("at least one image is required", param="image")
        if len(images) > task.spec.max_images:
            raise InvalidRequest(
                f"task {task.name!r} takes at most {task.spec.max_images} image(s); got {len(images)}",
                param="image",
            )
        fetcher = self.image_fetcher
        if fetcher is None or not any(is_image_url(data) for data in images):
            return images
        self.admission.check(priority, deadline)

        async def fetched(data: bytes | str, param: str) -> bytes | str:
            return await fetcher.fetch(data, param=param) if is_image_url(data) else data

        return await all_or_first_error(fetched(data, _image_param(i, images)) for i, data in enumerate(images))

    async def _normalize_all(self, task: Task, images: Sequence[bytes | str]) -> list[NormalizedImage]:
        return await all_or_first_error(
            self.normalizer.normalize(data, task.budget, param=_image_param(i, images))
            for i, data in enumerate(images)
        )

    async def _answer(
        self, task: Task, model: str, images: Sequence[NormalizedImage], locale: Locale, priority: int | None
    ) -> tuple[BaseModel | dict[str, Any], ScanUsage, list[str], str]:
        """Ask the engine; retry once, with more tokens, on a cut or invalid answer."""
        messages = build_messages(task, images, locale)
        scales = [img.scale for img in images]
        usage = ScanUsage()
        warnings: list[str] = []
        max_tokens = task.spec.sampling.max_tokens
        for attempt in (1, 2):
            payload = build_payload(task, model, messages, len(images), max_tokens)
            if priority is not None:
                payload["priority"] = priority
            with TRACER.start_as_current_span("scan answer", attributes={
                    "scanner.task": task.name, "scanner.attempt": attempt, "gen_ai.request.max_tokens": max_tokens}):
                completion = await self.engine.chat(payload)
            _add_usage(usage, completion)
            choice = completion.choices[0] if completion.choices else None
            text = choice.message.content if choice and isinstance(choice.message.content, str) else None
            try:
                with TRACER.start_as_current_span("validate", attributes={"scanner.task": task.name}):
                    if choice is not None and choice.finish_reason == "length":
                        raise OutputInvalid(f"answer cut at max_tokens={max_tokens}")
                    result, box_warnings = build_result(
                        parse_output(text, task.validator), scales, task.result_model
                    )
                return result, usage, warnings + box_warnings, completion.model
            except OutputInvalid as exc:
                self.metrics.output_failures.labels(task.name).inc()
                if attempt == 2:
                    raw = (text or "")[: self.raw_output_chars]
                    raise ModelOutputInvalid(
                        f"the model's answer was invalid twice ({exc}); raw output: {raw!r}"
                    ) from exc
                warnings.append(f"first answer invalid ({exc}); retried with more tokens")
                self.metrics.scan_retries.labels(task.name).inc()
                max_tokens *= RETRY_TOKEN_FACTOR
        raise AssertionError("unreachable")

    async def run(
        self,
        task_name: str,
        images: Sequence[bytes | str],
        locale: Locale | None = None,
        *,
        priority: PriorityClass = "interactive",
        idempotency_key: str | None = None,
    ) -> ScanResult:
        """Scan `images` with a task. Admission (429), then the deadline (504), bound it.

        With an `idempotency_key`, a repeat of the same request within the cache's TTL
        gets the first result (or joins it while it runs) instead of scanning again.
        """
        task = self.registry.get(task_name)
        locale = locale or self.default_locale
        if idempotency_key is None:
            return await self._admitted(task, images, locale, priority)
        fingerprint = request_fingerprint(task.name, locale, images)
        return await self.idempotency.run(
            idempotency_key, fingerprint, lambda: self._admitted(task, images, locale, priority)
        )

    async def _admitted(
        self, task: Task, images: Sequence[bytes | str], locale: Locale, priority: PriorityClass
    ) -> ScanResult:
        deadline = time.monotonic() + self.request_timeout_s
        try:
            images = await self._downloaded(task, images, priority, deadline)
            async with self.admission.slot(priority, deadline):
                try:
                    async with asyncio.timeout_at(deadline):
                        result = await self._scan(task, images, locale, priority)
                except TimeoutError as exc:
                    raise UpstreamTimeout(
                        f"scan did not finish within the {self.request_timeout_s:g} s request deadline"
                    ) from exc
        except GatewayError as err:
            self.metrics.scans.labels(task.name, err.code).inc()
            raise
        except asyncio.CancelledError:
            self.metrics.scans.labels(task.name, ClientClosedRequest.code).inc()
            raise
        self.metrics.scans.labels(task.name, "ok").inc()
        self.metrics.preprocess_seconds.labels(task.name).observe(result.timings_ms.preprocess / 1000)
        self.metrics.engine_seconds.labels(task.name).observe(result.timings_ms.engine / 1000)
        for image in result.images:
            self.metrics.image_bytes.observe(image.bytes)
            self.metrics.image_pixels.observe(image.width * image.height)
        return result

    async def _scan(
        self, task: Task, images: Sequence[bytes | str], locale: Locale, priority: PriorityClass
    ) -> ScanResult:
        started = time.perf_counter()
        normalized = await self._normalize_all(task, images)
        preprocess_ms = (time.perf_counter() - started) * 1000

        model = await self.engine.model_name()
        engine_started = time.perf_counter()
        engine_priority = self.engine_priorities[priority] if self.engine_priorities else None
        result, usage, warnings, served_model = await self._answer(
            task, model, normalized, locale, engine_priority
        )
        engine_ms = (time.perf_counter() - engine_started) * 1000
        return ScanResult(
            id=f"scan-{uuid.uuid4().hex}",
            task=task.name,
            task_version=str(task.spec.version),
            model=served_model,
            created=int(time.time()),
            locale=locale,
            images=[
                ImageInfo(
                    width=img.scale.original_width,
                    height=img.scale.original_height,
                    format=img.source_format,
                    bytes=img.source_bytes,
                    sent_width=img.scale.sent_width,
                    sent_height=img.scale.sent_height,
                )
                for img in normalized
            ],
            result=result,
            usage=usage,
            timings_ms=ScanTimings(
                preprocess=round(preprocess_ms, 2),
                engine=round(engine_ms, 2),
                total=round((time.perf_counter() - started) * 1000, 2),
            ),
            warnings=warnings,
        )


def _image_param(index: int, images: Sequence[bytes | str]) -> str:
    return f"image[{index}]" if len(images) > 1 else "image"


def _add_usage(total: ScanUsage, completion: ChatCompletion) -> None:
    if completion.usage is not None:
        total.prompt_tokens += completion.usage.prompt_tokens
        total.completion_tokens += completion.usage.completion_tokens
        total.total_tokens += completion.usage.total_tokens


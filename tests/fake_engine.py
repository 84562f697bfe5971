"""FAKE ENGINE: a tiny HTTP server that plays vLLM for contract and fault-injection tests.

It speaks real HTTP on a real socket (the gateway's aiohttp client cannot tell it from
vLLM), so dropped connections, slow answers and 5xx are injected the way they happen.
The real engine path is covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from scanner_gateway.scan.schema import sample_instance

FAKE_MODEL = "fake-engine-model"


@dataclass
class FakeReply:
    status: int = 200
    chunks: tuple[bytes, ...] = ()
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    delay_s: float = 0.0  # before the status line
    drop: bool = False  # close the connection instead of answering
    until: threading.Event | None = None  # held until the test sets it (at most a minute)

    @classmethod
    def json(cls, status: int, body: Any) -> FakeReply:
        return cls(status, (json.dumps(body).encode(),))


def completion(content: str, finish_reason: str = "stop") -> FakeReply:
    return FakeReply.json(200, {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": FAKE_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })


def streamed(status: int, *chunks: bytes, content_type: str = "application/json", **headers: str) -> FakeReply:
    """A body sent in several writes, like a real engine's streamed answer."""
    return FakeReply(status, chunks, {"content-type": content_type, **headers})


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class FakeEngine:
    """Answers chat completions with `answer(payload)` (default: a schema-valid sample)."""

    answer: Callable[[dict[str, Any]], FakeReply] | None = None
    url: str = ""  # set by the server that serves it
    healthy: bool = True
    waiting: int = 0  # reported as vllm:num_requests_waiting
    running: int = 0  # reported as vllm:num_requests_running
    metrics_status: int = 200  # anything else: /metrics answers that status, no gauges
    model: str = FAKE_MODEL  # listed by /v1/models
    strict_model: bool = False  # completions for another model get vLLM's 404, as vLLM does
    payloads: list[dict[str, Any]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def reply(self, path: str, body: bytes) -> FakeReply:
        if path == "/health":
            return FakeReply(200 if self.healthy else 503)
        if path == "/metrics" and self.metrics_status != 200:
            return FakeReply(self.metrics_status)
        if path == "/metrics":
            text = (f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {self.waiting}\n"
                    f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {self.running}\n")
            return FakeReply(200, (text.encode(),), {"content-type": "text/plain"})
        if path == "/v1/models":
            return FakeReply.json(200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        payload = json.loads(body)
        self.payloads.append(payload)
        if self.strict_model and payload.get("model") != self.model:
            return FakeReply.json(404, {"error": {"message": f"The model `{payload.get('model')}` does not exist.",
                                                  "type": "NotFoundError", "param": "model", "code": 404}})
        if self.answer is not None:
            return self.answer(payload)
        if "response_format" not in payload:  # a plain chat request
            return completion("fake answer")
        schema = payload["response_format"]["json_schema"]["schema"]
        return completion(json.dumps(sample_instance(schema)))


class FakeEngineServer:
    """Serves whichever FakeEngine is in `.engine`, from a background thread."""

    def __init__(self, engine: FakeEngine | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.engine = engine or FakeEngine()
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.engine.received.append(Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body))
        reply = self.engine.reply(request.path, body)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.until is not None:
            await asyncio.to_thread(reply.until.wait, 60)
        if reply.drop:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more to say on a dead connection
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        await response.prepare(request)
        for chunk in reply.chunks:
            await response.write(chunk)
            await asyncio.sleep(0.001)  # separate writes, as a streaming engine does
        await response.write_eof()
        return response

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # stop() acts as a crash: no grace period, in-flight requests are cut. (Not 0:
        # aiohttp reads a timeout of 0 as "none" and may then wait for a cut request forever.)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.01)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = self.engine.url = f"http://{host}:{port}"

    async def _crash(self) -> None:
        """Stop listening and cut every open connection at once, as a dying engine does."""
        assert self._runner is not None
        for site in list(self._runner.sites):
            await site.stop()
        if self._runner.server is not None:
            for handler in list(self._runner.server.connections):
                if handler.transport is not None:
                    handler.transport.abort()
        await self._runner.cleanup()
        # Handlers of cut requests may still wait on their sleeps: end them before the loop closes.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def start(self) -> FakeEngineServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._crash(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

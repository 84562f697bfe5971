"""A FAKE ENGINE: a tiny raw-ASGI app that answers like vLLM without a model, for what
only a fake can measure (the gateway's own overhead and admission).

    python -m bench.fake_engine PORT DELAY_S [PER_RUNNING_S [SEATS]]

It answers every chat completion after DELAY_S plus PER_RUNNING_S per request already
running (a batching engine answers a request that arrives into a busy batch later than
one that finds it empty), runs at most SEATS at once (0: no limit; the rest wait in its
queue, as vLLM's --max-num-seqs makes them) and reports both as vLLM's gauges on
/metrics. It streams SSE when asked, and answers a scan (a body with `response_format`)
with a schema-valid sample.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from bench.common import ROOT, wait_http


def start_fake_engine(port: int, delay_s: float, per_running_s: float = 0.0, seats: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "bench.fake_engine", str(port), str(delay_s),
                             str(per_running_s), str(seats)], cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


ANSWER = (b'{"id":"x","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,"message":'
          b'{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
EVENT = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
GAUGES = "vllm:num_requests_running %d\nvllm:num_requests_waiting %d\nvllm:kv_cache_usage_perc 0.1\n"


class FakeEngine:
    def __init__(self, delay_s: float, per_running_s: float, seats: int) -> None:
        self.delay_s, self.per_running_s = delay_s, per_running_s
        self.seats = asyncio.Semaphore(seats) if seats else None
        self.running = self.waiting = 0

    async def __call__(self, scope: dict, receive, send) -> None:  # ASGI
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] in ("/health", "/metrics"):
            await send_body(send, (GAUGES % (self.running, self.waiting)).encode() if scope["path"] == "/metrics" else b"")
            return
        await self._work()
        if b'"stream": true' in body:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for _ in range(5):
                await send({"type": "http.response.body", "body": EVENT, "more_body": True})
                await asyncio.sleep(0.005)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer_for(body)})

    async def _work(self) -> None:
        if self.seats is not None:
            self.waiting += 1
            try:
                await self.seats.acquire()
            finally:
                self.waiting -= 1
        delay = self.delay_s + self.per_running_s * self.running
        self.running += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.running -= 1
            if self.seats is not None:
                self.seats.release()


async def read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def send_body(send, body: bytes, content_type: bytes | None = None) -> None:
    headers = [(b"content-type", content_type)] if content_type else []
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def answer_for(body: bytes) -> bytes:
    if b'"response_format"' not in body:
        return ANSWER
    # A scan (bench/upload_burst.py): a schema-valid sample as the answer's content.
    from scanner_gateway.scan.schema import sample_instance

    schema = json.loads(body)["response_format"]["json_schema"]["schema"]
    content = json.dumps(json.dumps(sample_instance(schema))).encode()
    return ANSWER.replace(b'"content":"ok"', b'"content":' + content)


def serve(port: int, delay_s: float, per_running_s: float = 0.0, seats: int = 0) -> None:
    import uvicorn

    uvicorn.run(FakeEngine(delay_s, per_running_s, seats), host="127.0.0.1", port=port, log_level="error",
                access_log=False)


if __name__ == "__main__":
    args = sys.argv[1:]
    serve(int(args[0]), float(args[1]), float(args[2]) if len(args) > 2 else 0.0, int(args[3]) if len(args) > 3 else 0)

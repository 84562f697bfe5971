"""A FAKE ENGINE with a GPU's capacity curve, for bench/scale.py: no model, no CPU work.

    python -m bench.gpu_like_engine HOST PORT SERVICE_S KNEE SEATS

Every running request shares one batch: up to KNEE running, each step takes the same time
and a request is answered SERVICE_S after it started; past KNEE, steps grow with the
batch, so each request advances at KNEE/running of that speed (processor sharing). Its
capacity is KNEE/SERVICE_S requests a second however many are sent. At most SEATS run
(vLLM's --max-num-seqs); the rest wait. /metrics reports vLLM's gauges and
`fake:requests_served_total`. Answers are bench.fake_engine's (a scan gets a
schema-valid sample).
"""

from __future__ import annotations

import asyncio
import sys

from bench.fake_engine import answer_for, read_body, send_body

GAUGES = ("vllm:num_requests_running %d\nvllm:num_requests_waiting %d\nvllm:kv_cache_usage_perc 0.1\n"
          "fake:requests_served_total %d\n")


class GpuLikeEngine:
    def __init__(self, service_s: float, knee: int, seats: int) -> None:
        self.service_s, self.knee, self.seat_count = service_s, knee, seats
        self.running: dict[asyncio.Future[None], float] = {}  # request -> virtual time it ends
        self.waiting = self.served = 0
        self._virtual = self._virtual_at = 0.0  # work done per running request, and when
        self._timer: asyncio.TimerHandle | None = None
        self._seats: asyncio.Semaphore | None = None

    def _speed(self) -> float:
        return min(1.0, self.knee / len(self.running)) if self.running else 1.0

    def _advance(self, now: float) -> None:
        self._virtual += (now - self._virtual_at) * self._speed()
        self._virtual_at = now

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.running:
            left = max(0.0, min(self.running.values()) - self._virtual)
            self._timer = loop.call_at(self._virtual_at + left / self._speed(), self._finish_due, loop)

    def _finish_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._advance(loop.time())
        for request, ends in list(self.running.items()):
            if ends <= self._virtual + 1e-9:
                del self.running[request]
                self.served += 1
                if not request.done():
                    request.set_result(None)
        self._schedule(loop)

    async def work(self) -> None:
        if self._seats is None:
            self._seats = asyncio.Semaphore(self.seat_count)
        self.waiting += 1
        try:
            await self._seats.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        request: asyncio.Future[None] = loop.create_future()
        try:
            self._advance(loop.time())
            self.running[request] = self._virtual + self.service_s
            self._schedule(loop)
            await request
        finally:
            if request in self.running:  # the client left: its share goes to the others
                self._advance(loop.time())
                del self.running[request]
                self._schedule(loop)
            self._seats.release()

    async def __call__(self, scope: dict, receive, send) -> None:  # ASGI
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] in ("/health", "/metrics"):
            text = GAUGES % (len(self.running), self.waiting, self.served) if scope["path"] == "/metrics" else ""
            await send_body(send, text.encode())
            return
        await self.work()
        await send_body(send, answer_for(body), b"application/json")


if __name__ == "__main__":
    import uvicorn

    host, port, service_s, knee, seats = sys.argv[1:6]
    uvicorn.run(GpuLikeEngine(float(service_s), int(knee), int(seats)), host=host, port=int(port),
                log_level="error", access_log=False)

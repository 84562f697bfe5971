"""The design we replace, rebuilt faithfully for side-by-side measurement (bench/compare.py).

    python -m bench.seed_systems before --model DIR --port P --max-new-tokens N
    python -m bench.seed_systems after  --model DIR --port P --max-new-tokens N [--workers 4]

- `before`: the Streamlit app's serving model: one synchronous process that handles one
  request at a time (stdlib HTTPServer, single thread) with transformers `generate`.
- `after`: the published FastAPI design, deployed as it was (`gunicorn -w 4 -k
  uvicorn.workers.UvicornWorker`: here uvicorn's own `--workers 4`, the same four
  processes behind one port): in each worker an async endpoint, a thread pool for image
  decoding, its own model copy and a hand-made dynamic batcher (max batch 4, 100 ms
  timeout) calling transformers `generate` on the batch. On a GPU the batcher has the
  seed's pynvml gate: a batch is flushed early, without waiting out its timeout, while
  the GPU is under 70% busy.

Both take `POST /scan` (multipart `image`, like /v1/scan), build the same product_scan
prompt as the gateway (same task file, English), greedy-decode exactly
`--max-new-tokens` tokens (random-weight models never stop by themselves) and return
the text with the prompt and completion tokens it took. The image goes to the processor
as received: no pixel budget (that was the original design; bench/compare.py sends
pre-sized photos for the like-for-like view).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import typer
from fastapi import FastAPI, File, UploadFile

MAX_BATCH = 4
BATCH_TIMEOUT_S = 0.1
GPU_GATE_BUSY = 0.70  # the seed's gate: flush a batch early while the GPU is less busy than this
SEED_AFTER_WORKERS = 4  # gunicorn -w 4, as the seed deployed it
ROOT = Path(__file__).resolve().parents[1]


class Generator:
    """transformers Qwen3-VL: prompt + PIL images -> generated texts (one call, one batch)."""

    def __init__(self, model_dir: str, max_new_tokens: int) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

        from scanner_gateway.scan.tasks import TaskRegistry

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        # On a GPU as the seed ran there (bf16); float32 on CPU, where bf16 matmuls are slow.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        if any(Path(model_dir).glob("*.safetensors")):
            model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(self.device)
        else:  # shapes only (make-dev-model --preset qwen3-vl-8b): random weights, as vLLM's dummy load
            config = AutoConfig.from_pretrained(model_dir)
            with torch.device(self.device):
                model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
        self.model = model.eval()
        self.max_new_tokens = max_new_tokens
        system, user = TaskRegistry.load(ROOT / "prompts").get("product_scan").render("en", 1)
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.lock = threading.Lock()  # one generate at a time: the model is not re-entrant

    def generate(self, images: list) -> list[dict]:
        """Per image: its text and usage (prompt tokens without the batch's padding)."""
        inputs = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt",
                                padding=True).to(self.device)
        with self.lock, self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                      min_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [{"text": text, "usage": {"prompt_tokens": int(prompt), "completion_tokens": int(new.shape[1])}}
                for text, prompt in zip(self.processor.batch_decode(new, skip_special_tokens=True), prompt_tokens,
                                        strict=True)]


class GpuGate:
    """The seed's pynvml gate: is the GPU less busy than GPU_GATE_BUSY? (Never, without one.)"""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:
            self.handle = None

    def idle(self) -> bool:
        return self.handle is not None and self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100 < GPU_GATE_BUSY


def decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def image_from_multipart(content_type: str, body: bytes) -> bytes:
    """The `image` part of a multipart body (stdlib only, as the sync server has no framework)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            return part.get_payload(decode=True)
    raise ValueError("no 'image' part")


def serve_before(model_dir: str, port: int, max_new_tokens: int) -> None:
    generator = Generator(model_dir, max_new_tokens)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(200, {"status": "ok"})

        def do_POST(self) -> None:
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                image = decode(image_from_multipart(self.headers["Content-Type"], body))
                started = time.perf_counter()
                answer = generator.generate([image])[0]
                self._answer(200, {**answer, "generate_s": time.perf_counter() - started})
            except Exception as exc:  # the seed app answered errors as 500s
                self._answer(500, {"error": str(exc)})

    HTTPServer.request_queue_size = 128
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


@dataclass
class Batcher:
    """Collects up to MAX_BATCH requests or waits BATCH_TIMEOUT_S, then generates them together."""

    generator: Generator
    gate: GpuGate = field(default_factory=GpuGate)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + BATCH_TIMEOUT_S
            while len(batch) < MAX_BATCH and (left := deadline - loop.time()) > 0:
                if self.queue.empty() and self.gate.idle():
                    break  # the GPU has room: run what there is now
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            images = [image for image, _ in batch]
            try:
                answers = await loop.run_in_executor(self.pool, self.generator.generate, images)
                for (_, future), answer in zip(batch, answers, strict=True):
                    future.set_result(answer)
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)


def build_after_app(model_dir: str, max_new_tokens: int) -> FastAPI:
    from contextlib import asynccontextmanager

    decode_pool = ThreadPoolExecutor(4)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["batcher"] = Batcher(Generator(model_dir, max_new_tokens))
        task = asyncio.create_task(state["batcher"].run())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/scan")
    async def scan(image: UploadFile = File(...)) -> dict:  # noqa: B008
        loop = asyncio.get_running_loop()
        picture = await loop.run_in_executor(decode_pool, decode, await image.read())
        future = loop.create_future()
        await state["batcher"].queue.put((picture, future))
        return await future

    return app


def after_app_from_env() -> FastAPI:
    """For uvicorn's worker processes: each builds its own app, model and batcher."""
    return build_after_app(os.environ["SEED_MODEL"], int(os.environ["SEED_MAX_NEW_TOKENS"]))


def main(
    system: str = typer.Argument(..., help="before or after"),
    model: str = typer.Option(...), port: int = typer.Option(...), max_new_tokens: int = typer.Option(...),
    workers: int = typer.Option(SEED_AFTER_WORKERS, help="after: worker processes (the seed's gunicorn -w)."),
) -> None:
    if system == "before":
        serve_before(model, port, max_new_tokens)
    elif system == "after":
        import uvicorn

        os.environ.update(SEED_MODEL=model, SEED_MAX_NEW_TOKENS=str(max_new_tokens))
        uvicorn.run("bench.seed_systems:after_app_from_env", factory=True, workers=workers, app_dir=str(ROOT),
                    host="127.0.0.1", port=port, log_level="warning", timeout_worker_healthcheck=600)
    else:
        raise typer.BadParameter("system must be 'before' or 'after'")


if __name__ == "__main__":
    typer.run(main)

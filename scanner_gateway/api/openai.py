"""OpenAI-compatible surface: GET /v1/models, POST /v1/chat/completions."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from scanner_gateway.api.deps import EngineDep, RegistryDep, ScanServiceDep, error_responses
from scanner_gateway.errors import InvalidRequest
from scanner_gateway.protocol import ModelCard, ModelList
from scanner_gateway.scan import chat_adapter
from scanner_gateway.upstream import passthrough

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 502, 503, 504))
async def list_models(engine: EngineDep, registry: RegistryDep) -> ModelList:
    """The engine's models plus one `scan/<task>` pseudo-model per scan task."""
    cards = await engine.list_models()
    cards += [
        ModelCard(id=f"{chat_adapter.SCAN_MODEL_PREFIX}{task.name}", owned_by="scanner-gateway")
        for task in registry
    ]
    return ModelList(data=cards)


def _routing_fields(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", param="body") from exc
    if not isinstance(request, dict):
        raise InvalidRequest("body must be a JSON object", param="body")
    if not isinstance(request.get("model"), str) or not request["model"]:
        raise InvalidRequest("'model' is required (see GET /v1/models)", param="model")
    return request


@router.post(
    "/v1/chat/completions",
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504),
)
async def chat_completions(
    request: Request, engine: EngineDep, service: ScanServiceDep
) -> Response:
    """Forwarded to vLLM untouched; `scan/<task>` models run that scan task instead."""
    body = await request.body()
    fields = _routing_fields(body)
    task = chat_adapter.scan_task_name(fields["model"])
    if task is None:
        return await passthrough.forward(
            engine, "/v1/chat/completions", body, request.headers.get("content-type", "")
        )
    result = await chat_adapter.scan_as_chat(service, task, fields)
    if fields.get("stream"):
        return StreamingResponse(
            chat_adapter.chat_completion_chunks(result), media_type="text/event-stream"
        )
    return JSONResponse(chat_adapter.chat_completion(result))

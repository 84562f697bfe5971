"""OpenAI-compatible routes: GET /v1/models, and POST /v1/chat/completions and
/v1/responses for `scan/<task>` models.

Requests for engine models never reach these routes: the relay's door (`relay.py`)
forwards them first and sends here only bodies whose `model` is a scan model. The
routes are declared for all of them, so the OpenAPI document describes every request.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from scanner_gateway.admission import PRIORITY_HEADER, parse_priority
from scanner_gateway.api.deps import (
    PoolDep,
    RegistryDep,
    ScanServiceDep,
    SettingsDep,
    error_responses,
    scoped_idempotency_key,
)
from scanner_gateway.api.disconnect import cancel_on_disconnect
from scanner_gateway.api.openai import chat_frames, responses_frames
from scanner_gateway.api.paths import CHAT_PATH, MODELS_PATH, RESPONSES_PATH
from scanner_gateway.api.scan_streams import stream_scan
from scanner_gateway.errors import NotFound, echo
from scanner_gateway.protocol import ModelCard, ModelList
from scanner_gateway.scan.scan_models import SCAN_MODEL_PREFIX, scan_task_name

router = APIRouter(tags=["openai"])


@router.get(MODELS_PATH, response_model=ModelList, responses=error_responses(401, 502, 503, 504))
async def list_models(pool: PoolDep, registry: RegistryDep) -> ModelList:
    """The engine's models plus one `scan/<task>` pseudo-model per scan task."""
    cards = await pool.list_models()
    cards += [
        ModelCard(id=f"{SCAN_MODEL_PREFIX}{task.name}", created=registry.loaded_at, owned_by="scanner-gateway")
        for task in registry
    ]
    return ModelList(data=cards)


@router.get(
    MODELS_PATH + "/{model:path}", response_model=ModelCard, responses=error_responses(401, 404, 502, 503, 504)
)
async def retrieve_model(model: str, pool: PoolDep, registry: RegistryDep) -> ModelCard:
    """One model of the list (`client.models.retrieve(...)` in the OpenAI SDKs)."""
    for card in (await list_models(pool, registry)).data:
        if card.id == model:
            return card
    raise NotFound(f"model {echo(model)} does not exist; GET /v1/models lists them", param="model")


_RELAY_ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 502, 503, 504)


@router.post(CHAT_PATH, responses=_RELAY_ERRORS)
async def chat_completions(request: Request, service: ScanServiceDep, settings: SettingsDep) -> Response:
    """Forwarded to vLLM untouched; `scan/<task>` models run that scan task instead."""
    body = await request.body()
    fields, task = _scan_model_request(body)
    priority = parse_priority(request.headers.get(PRIORITY_HEADER), settings.scan_priority)
    key = scoped_idempotency_key(request)
    scan = chat_frames.scan_as_chat(service, task, fields, priority, key)
    if fields.get("stream"):
        chunks = chat_frames.ChatChunkStream(task, include_usage=chat_frames.wants_usage_chunk(fields))
        return await stream_scan(request, scan, chunks)
    return JSONResponse(chat_frames.chat_completion(await cancel_on_disconnect(request, scan)))


@router.post(RESPONSES_PATH, responses=_RELAY_ERRORS)
async def responses(request: Request, service: ScanServiceDep, settings: SettingsDep) -> Response:
    """The Responses API: forwarded to vLLM untouched; `scan/<task>` models run that scan task instead."""
    body = await request.body()
    fields, task = _scan_model_request(body)
    priority = parse_priority(request.headers.get(PRIORITY_HEADER), settings.scan_priority)
    key = scoped_idempotency_key(request)
    scan = responses_frames.scan_as_response(service, task, fields, priority, key)
    if fields.get("stream"):
        return await stream_scan(request, scan, responses_frames.ResponseEventStream(task))
    return JSONResponse(responses_frames.response_object(await cancel_on_disconnect(request, scan)))


def _scan_model_request(body: bytes) -> tuple[dict[str, Any], str]:
    """The parsed body and the scan task its `model` names (the relay's door sent only
    such bodies here)."""
    fields = json.loads(body)
    task = scan_task_name(fields["model"])
    assert task is not None, "the relay's door routes only scan-model bodies here"
    return fields, task

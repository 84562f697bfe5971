"""OpenAI wire models the gateway reads or writes. Lenient: unknown fields are kept."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | int | None  # ours are strings; an engine's relayed verdict may carry vLLM's int
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of every route: `{"error": {...}}`."""

    error: ErrorBody


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatChoice(_Lenient):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class Usage(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(_Lenient):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(_Lenient):
    id: str
    object: str = "model"
    created: int = 0  # a required field of OpenAI's Model object: strictly typed clients expect it
    owned_by: str = "vllm"


class ModelList(_Lenient):
    object: str = "list"
    data: list[ModelCard]

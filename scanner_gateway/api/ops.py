"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from scanner_gateway.api.deps import EngineDep, RegistryDep, error_responses
from scanner_gateway.errors import UpstreamUnavailable, error_response

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (no dependency checks)."""
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(registry: RegistryDep, engine: EngineDep) -> JSONResponse:
    """Ready when the tasks are loaded and the engine answers its /health."""
    if not await engine.healthy():
        return error_response(UpstreamUnavailable(f"engine at {engine.base_url} is not healthy"))
    return JSONResponse({"status": "ready", "tasks": len(registry), "engine": engine.base_url})

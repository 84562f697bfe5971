"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from scanner_gateway.api.deps import PoolDep, RegistryDep, error_responses
from scanner_gateway.errors import UpstreamUnavailable, error_response

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (no dependency checks)."""
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(registry: RegistryDep, pool: PoolDep) -> JSONResponse:
    """Ready when the tasks are loaded and at least one engine replica is healthy."""
    replicas = [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight} for r in pool.replicas]
    if not pool.ready():
        return error_response(UpstreamUnavailable(f"no healthy engine replica: {replicas}"))
    return JSONResponse({"status": "ready", "tasks": len(registry), "replicas": replicas})

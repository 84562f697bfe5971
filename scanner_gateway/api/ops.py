"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from scanner_gateway.api.deps import PoolDep, RegistryDep, StateDep, error_responses
from scanner_gateway.api.errors import error_response
from scanner_gateway.api.paths import HEALTH_PATH, METRICS_PATH, READY_PATH
from scanner_gateway.errors import Draining, UpstreamUnavailable

router = APIRouter(tags=["ops"])


@router.get(HEALTH_PATH)
@router.head(HEALTH_PATH, include_in_schema=False)  # uptime monitors and some load balancers probe with HEAD
async def health() -> dict[str, str]:
    """The process is alive (no dependency checks)."""
    return {"status": "ok"}


@router.get(METRICS_PATH, response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (`scanner_*`), from every worker process."""
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get(READY_PATH, responses=error_responses(503))
@router.head(READY_PATH, include_in_schema=False)
async def ready(state: StateDep, registry: RegistryDep, pool: PoolDep) -> JSONResponse:
    """Ready when the tasks are loaded, at least one engine replica is healthy, and the
    gateway is not draining for shutdown."""
    if state.draining:
        return error_response(Draining("shutting down: finishing in-flight requests"))
    replicas = [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, **({"leaving": True} if r.leaving else {})}
                for r in pool.replicas]
    if not pool.ready():
        return error_response(UpstreamUnavailable(f"no healthy engine replica: {replicas}"))
    return JSONResponse({"status": "ready", "tasks": len(registry), "replicas": replicas})

"""FastAPI dependencies: shared objects built in the lifespan (`api/state.py`).

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from scanner_gateway.api.auth import client_scope
from scanner_gateway.api.state import GatewayState, gateway_state
from scanner_gateway.config import Settings
from scanner_gateway.protocol import ErrorResponse
from scanner_gateway.scan.idempotency import check_key
from scanner_gateway.scan.service import ScanService
from scanner_gateway.scan.tasks import TaskRegistry
from scanner_gateway.upstream.pool import ReplicaPool


async def get_state(request: Request) -> GatewayState:
    return gateway_state(request.app)


async def get_scan_service(request: Request) -> ScanService:
    return gateway_state(request.app).scan_service


async def get_registry(request: Request) -> TaskRegistry:
    return gateway_state(request.app).registry


async def get_pool(request: Request) -> ReplicaPool:
    return gateway_state(request.app).pool


async def get_settings(request: Request) -> Settings:
    return gateway_state(request.app).settings


StateDep = Annotated[GatewayState, Depends(get_state)]
ScanServiceDep = Annotated[ScanService, Depends(get_scan_service)]
RegistryDep = Annotated[TaskRegistry, Depends(get_registry)]
PoolDep = Annotated[ReplicaPool, Depends(get_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

IDEMPOTENCY_HEADER = "idempotency-key"


def scoped_idempotency_key(request: Request) -> str | None:
    """The client's `Idempotency-Key`, checked, and scoped to its credentials: two stores
    may pick the same key."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    return f"{client_scope(request.headers.get('authorization'))}:{check_key(key)}"


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI declaration of the error shape for the given status codes."""
    return {status: {"model": ErrorResponse} for status in statuses}

"""FastAPI dependencies: shared objects built in the lifespan, read from app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from scanner_gateway.protocol import ErrorResponse
from scanner_gateway.scan.service import ScanService
from scanner_gateway.scan.tasks import TaskRegistry
from scanner_gateway.upstream.client import EngineClient


def get_scan_service(request: Request) -> ScanService:
    return request.app.state.scan_service


def get_registry(request: Request) -> TaskRegistry:
    return request.app.state.registry


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


ScanServiceDep = Annotated[ScanService, Depends(get_scan_service)]
RegistryDep = Annotated[TaskRegistry, Depends(get_registry)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI declaration of the error shape for the given status codes."""
    return {status: {"model": ErrorResponse} for status in statuses}

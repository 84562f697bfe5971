"""What the lifespan builds and every request reads: one object, reached one way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scanner_gateway.admission import AdmissionController
from scanner_gateway.batches.service import BatchService
from scanner_gateway.config import Settings
from scanner_gateway.metrics import GatewayMetrics
from scanner_gateway.scan.service import ScanService
from scanner_gateway.scan.tasks import TaskRegistry
from scanner_gateway.upstream.pool import ReplicaPool

if TYPE_CHECKING:
    from scanner_gateway.api.openai.relay import ChatRelay


@dataclass
class GatewayState:
    settings: Settings
    metrics: GatewayMetrics
    registry: TaskRegistry
    pool: ReplicaPool
    admission: AdmissionController
    chat_relay: ChatRelay
    scan_service: ScanService
    batches: BatchService
    draining: bool = False  # set on SIGTERM: /ready says 503 while requests in flight finish


def gateway_state(app: Any) -> GatewayState:
    """The app's state, from a route (`request.app`) or raw ASGI (`scope["app"]`)."""
    return app.state.gateway

"""create_app(settings): the gateway, built by a factory so tests can build their own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
from fastapi import FastAPI, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from scanner_gateway import __version__
from scanner_gateway.admission import AdmissionController
from scanner_gateway.api import batches, openai, ops, scan, web
from scanner_gateway.api.auth import ApiKeyAuth
from scanner_gateway.api.batch_dispatch import AsgiDispatch
from scanner_gateway.api.errors import install_error_handlers
from scanner_gateway.api.limits import BodySizeLimit, KeyConcurrencyLimit
from scanner_gateway.api.observability import RequestContext
from scanner_gateway.api.openai.relay import ChatRelay, RelayDoor
from scanner_gateway.api.paths import (
    BATCH_ENDPOINTS,
    DOCS_ASSETS_PATH,
    FILES_PATH,
    RELAYED_PATHS,
    SCAN_PATH,
    UI_PATH,
)
from scanner_gateway.api.state import GatewayState
from scanner_gateway.batches.database import open_database
from scanner_gateway.batches.file_storage import FileStorage
from scanner_gateway.batches.runner import BatchRunner, RunnerSettings
from scanner_gateway.batches.service import BatchLimits, BatchService
from scanner_gateway.batches.store import BatchStore
from scanner_gateway.config import Settings
from scanner_gateway.drain import drain_on_sigterm
from scanner_gateway.loop_lag import LoopStalls, watch_loop_lag
from scanner_gateway.metrics import GatewayMetrics
from scanner_gateway.scan.idempotency import IdempotencyCache
from scanner_gateway.scan.image_urls import ImageFetcher
from scanner_gateway.scan.images import ImageNormalizer
from scanner_gateway.scan.service import ScanService
from scanner_gateway.scan.tasks import TaskRegistry
from scanner_gateway.tracing import start_tracing, tracing_requested
from scanner_gateway.upstream.client import EngineClient, build_session
from scanner_gateway.upstream.discovery import DnsResolver, ReplicaDiscovery
from scanner_gateway.upstream.pool import ReplicaPool
from scanner_gateway.upstream.relay_media import RelayMedia
from scanner_gateway.upstream.routing import build_policy

log = logging.getLogger(__name__)
MIB = 1024 * 1024
# What a browser page may send and read cross-origin (SCANNER_CORS_ORIGINS).
CORS_REQUEST_HEADERS = ("authorization", "content-type", "x-priority", "idempotency-key", "x-request-id")
CORS_EXPOSED_HEADERS = ("x-request-id", "retry-after")
CORS_MAX_AGE_S = 600
# A batch item's in-process call may take its request deadline and this much more before the worker gives up on it.
BATCH_DISPATCH_MARGIN_S = 60.0


def request_size_limit(settings: Settings, registry: TaskRegistry) -> int:
    if settings.max_request_bytes:
        return settings.max_request_bytes
    most_images = registry.most_images()
    # base64 in JSON bodies costs 4/3; 1 MiB for form fields and JSON framing.
    return most_images * settings.max_image_bytes * 4 // 3 + MIB


def image_queue_limit(settings: Settings, registry: TaskRegistry, max_in_flight: int) -> int:
    """Every decode runs inside an admitted scan, so a queue that holds all the photos
    those can bring never refuses one that admission let in (measured before this on an
    H200 box at c=128: 888 such 429s from a queue of 64)."""
    admitted_images = max_in_flight * registry.most_images()
    if not settings.image_queue_limit:
        return admitted_images
    if settings.image_queue_limit < admitted_images:
        log.warning("SCANNER_IMAGE_QUEUE_LIMIT=%d is below the %d photos admitted scans can bring: "
                    "some scans the admission let in will get 429", settings.image_queue_limit, admitted_images)
    return settings.image_queue_limit


def create_app(settings: Settings) -> FastAPI:
    """Build the app. Task files and upstream URLs are checked here, so a bad one stops
    startup at once."""
    registry = TaskRegistry.load(settings.prompts_dir)
    upstream_urls = settings.upstream_urls()
    metrics = GatewayMetrics()
    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN; offline (a store,
    # a closed network) they would be blank pages. These ship the files in the package.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_PATH,
        title="Scanner gateway",
        version=__version__,
        description="Retail-vision scans (shelves, price tags, storefronts, kitchens) on vLLM.",
        lifespan=_lifespan(settings, registry, metrics, upstream_urls),
    )
    install_error_handlers(app)
    keys = settings.client_keys()
    _include_routes(app, keys_required=bool(keys))
    _add_middleware(app, settings, keys, registry, metrics)
    return app


def _lifespan(
    settings: Settings, registry: TaskRegistry, metrics: GatewayMetrics, upstream_urls: list[str]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The shared clients, pools and queues: built at startup, closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracer_provider = start_tracing()  # None unless OTEL_* ask for traces
        session = build_session(
            connect_timeout_s=settings.engine_connect_timeout_s,
            read_timeout_s=settings.engine_read_timeout_s,
            max_connections=settings.engine_max_connections,
        )
        stalls = LoopStalls()

        def engine_client(url: str) -> EngineClient:
            return EngineClient(session, url, api_key=settings.upstream_api_key)

        pool = ReplicaPool(
            [engine_client(url) for url in upstream_urls],
            build_policy(settings.routing),
            model=settings.model,
            probe_interval_s=settings.probe_interval_s,
            max_attempts=settings.upstream_attempts,
            metrics=metrics,
            stalled_since=stalls.stalled_since,
            queue_allowance=settings.engine_queue_allowance,
            saturation_kv=settings.engine_saturation_kv,
        )
        names = settings.upstream_names()
        discovery = ReplicaDiscovery(pool, names, DnsResolver(settings.dns_server) if names else None,
                                     engine_client, settings.discovery_interval_s, metrics)
        await pool.start()
        await discovery.start()
        max_in_flight = settings.max_in_flight(max(1, pool.members()))
        normalizer = ImageNormalizer(
            workers=settings.image_worker_count(),
            queue_limit=image_queue_limit(settings, registry, max_in_flight),
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            quality=settings.jpeg_quality,
        )
        admission = AdmissionController(
            max_in_flight=max_in_flight,
            queue_limit=settings.queue_limit,
            max_wait_s=settings.max_queue_wait_s,
            metrics=metrics,
            engine_room=pool.room,
        )
        pool.on_gauges = admission.refresh
        pool.on_replica_count = lambda count: admission.resize(settings.max_in_flight(max(1, count)))
        image_fetcher = _image_fetcher(settings)
        batch_store = BatchStore(await open_database(settings.database_url, settings.data_dir))
        await batch_store.create_schema()
        batch_files = FileStorage(settings.data_dir / "files")
        new_batch = asyncio.Event()
        state = app.state.gateway = GatewayState(
            settings=settings,
            metrics=metrics,
            registry=registry,
            pool=pool,
            admission=admission,
            chat_relay=ChatRelay(
                pool, admission, settings.chat_priority, settings.engine_priorities,
                RelayMedia(image_fetcher, settings.relay_media_kind_set(), max_urls=registry.most_images()),
            ),
            scan_service=ScanService(
                registry,
                normalizer,
                pool,
                admission,
                default_locale=settings.default_locale,
                raw_output_chars=settings.raw_output_in_errors,
                engine_priorities=settings.engine_priorities,
                request_timeout_s=settings.request_timeout_s,
                idempotency=IdempotencyCache(settings.idempotency_ttl_s, settings.idempotency_max_keys),
                metrics=metrics,
                image_fetcher=image_fetcher,
            ),
            batches=BatchService(
                batch_store, batch_files,
                BatchLimits(BATCH_ENDPOINTS, settings.batch_max_items, request_size_limit(settings, registry)),
                on_new_batch=new_batch,
            ),
        )
        batch_runner = BatchRunner(
            batch_store, batch_files,
            AsgiDispatch(app, timeout_s=settings.request_timeout_s + BATCH_DISPATCH_MARGIN_S),
            RunnerSettings(
                max_in_flight=settings.batch_max_in_flight, lease_s=settings.batch_lease_s,
                poll_s=settings.batch_poll_s, max_attempts=settings.batch_max_attempts,
            ),
            metrics=metrics, wake=new_batch, stopping=lambda: state.draining,
        )
        # Everything built so far lives as long as the process. Frozen, the collector stops
        # walking it on each full collection: those walks were ~40 ms stalls, the relay's p99.
        gc.collect()
        gc.freeze()

        def observe_lag(lag: float) -> None:
            metrics.loop_lag.observe(lag)
            stalls.observe(lag)

        lag_watch = asyncio.create_task(watch_loop_lag(observe_lag), name="loop-lag")
        batch_runner.start()
        try:
            with drain_on_sigterm(state, settings.drain_s):
                yield
        finally:
            await batch_runner.stop()  # its running items go back to wait, for the next worker
            await batch_store.db.close()
            lag_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_watch
            gc.unfreeze()
            normalizer.close()
            await discovery.close()
            await pool.close()
            await session.close()
            await image_fetcher.client.aclose()
            if tracer_provider is not None:
                await asyncio.to_thread(tracer_provider.shutdown)  # the last spans exported

    return lifespan


def _image_fetcher(settings: Settings) -> ImageFetcher:
    """The one image-URL policy of every route: scans and relayed requests fetch only from
    SCANNER_IMAGE_URL_HOSTS (none by default: then it refuses every URL, naming its host)."""
    return ImageFetcher(
        # Its own client: image hosts are the internet's, with other timeouts than the engines.
        httpx.AsyncClient(timeout=settings.image_fetch_timeout_s),
        settings.image_url_host_patterns(),
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.image_fetch_timeout_s,
        max_active=settings.image_fetch_max_active,
    )


def _include_routes(app: FastAPI, *, keys_required: bool) -> None:
    # ApiKeyAuth enforces the keys; this only declares them in the OpenAPI document, so
    # clients generated from it know to send a bearer key.
    documented_auth = [Security(HTTPBearer(auto_error=False, description="An API key"))] if keys_required else []
    app.include_router(scan.router, dependencies=documented_auth)
    app.include_router(openai.router, dependencies=documented_auth)
    app.include_router(batches.router, dependencies=documented_auth)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.mount(UI_PATH, StaticFiles(directory=web.WEB_DIR), name="ui")


def _add_middleware(
    app: FastAPI, settings: Settings, keys: list[str], registry: TaskRegistry, metrics: GatewayMetrics
) -> None:
    """Each add wraps the ones before it: the last added runs first on a request."""
    app.add_middleware(RelayDoor)  # engine-bound requests skip FastAPI entirely
    app.add_middleware(
        BodySizeLimit, max_bytes=request_size_limit(settings, registry), timeout_s=settings.body_timeout_s,
        max_buffered_bytes=settings.max_buffered_bytes,
        uploads={FILES_PATH: (settings.batch_max_file_bytes + MIB, settings.batch_upload_timeout_s)},
    )
    if keys and settings.max_in_flight_per_key:
        app.add_middleware(
            KeyConcurrencyLimit,
            max_in_flight=settings.max_in_flight_per_key,
            limited_paths={*RELAYED_PATHS, SCAN_PATH},
            metrics=metrics,
        )
    elif settings.max_in_flight_per_key:
        log.warning("SCANNER_MAX_IN_FLIGHT_PER_KEY is set but API keys are off: no per-key limit applies")
    app.add_middleware(ApiKeyAuth, keys=keys, metrics_need_key=settings.metrics_need_key)  # before any body is read
    if origins := settings.cors_origin_list():
        # Outside the key check: a browser's preflight carries no key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=list(CORS_REQUEST_HEADERS),
            expose_headers=list(CORS_EXPOSED_HEADERS),
            max_age=CORS_MAX_AGE_S,
        )
    app.add_middleware(RequestContext, metrics=metrics, access_log=settings.access_log,
                       tracing=tracing_requested())  # outermost


def create_app_from_env() -> FastAPI:
    """App factory for uvicorn's worker processes: settings from SCANNER_* variables."""
    return create_app(Settings())

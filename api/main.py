from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCache, RateLimiter
from api.errors import COMMON_RESPONSES, install_error_handlers
from api.limits import BodySizeLimit, check_request_shape
from api.prometheus import ModelyardCollector
from api.routes import (
    admin,
    batch_files,
    datasets,
    events_stream,
    health,
    jobs,
    metrics,
    models,
    monitors,
    openai_batches,
    openai_embeddings,
    openai_files,
    openai_fine_tuning,
    openai_serving,
    stream,
    ui,
    webhooks,
)
from api.routes.metrics import ScrapeCache
from core.dispatch import JobPublisher
from core.heap import freeze_startup_objects
from core.settings import Settings, get_settings
from core.token_stream import TokenStreamReader
from db.session import migrate

logger = logging.getLogger(__name__)


def create_server_app() -> FastAPI:
    """The app an API server process runs (api/serve.py): its startup ends by freezing
    what it allocated out of garbage collection (core.heap). Tests build theirs with
    `create_app`, which leaves the collector alone: a test process makes hundreds of apps."""
    return create_app(freeze_heap=True)


def create_app(settings: Settings | None = None, *, freeze_heap: bool = False) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await run_in_threadpool(migrate, settings.database_url)
        app.state.publisher = JobPublisher(settings)
        # made here: a limiter belongs to the running event loop's library
        app.state.create_limiter = anyio.CapacityLimiter(settings.create_concurrency)
        app.state.token_reader = TokenStreamReader(settings.broker_url)
        if settings.auth_disabled:
            logger.warning(
                "AUTH IS DISABLED (MODELYARD_AUTH_DISABLED): every request acts as the "
                "default tenant with all scopes; never expose this API"
            )
        if freeze_heap:
            freeze_startup_objects("api")
        logger.info("api ready")
        yield
        app.state.rate_limiter.close()
        app.state.publisher.close()
        await app.state.token_reader.aclose()

    app = FastAPI(
        title="Modelyard",
        version="0.1.0",
        lifespan=lifespan,
        responses=COMMON_RESPONSES,
        dependencies=[Depends(check_request_shape)],
    )
    app.state.settings = settings
    app.state.rate_limiter = RateLimiter(settings.broker_url)
    app.state.key_cache = KeyCache(settings.api_key_cache_s)
    app.state.metrics_registry = CollectorRegistry(auto_describe=False)
    app.state.metrics_registry.register(ModelyardCollector(settings))
    app.state.metrics_cache = ScrapeCache(app.state.metrics_registry)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        limits={
            ("POST", "/v1/datasets"): settings.max_upload_bytes,
            ("POST", "/v1/files"): settings.max_upload_bytes,
        },
    )
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(batch_files.router)
    app.include_router(stream.router)
    app.include_router(events_stream.router)
    app.include_router(models.router)
    app.include_router(monitors.router)
    app.include_router(datasets.router)
    app.include_router(webhooks.router)
    app.include_router(openai_files.router)
    app.include_router(openai_fine_tuning.router)
    app.include_router(openai_batches.router)
    app.include_router(openai_embeddings.router)
    app.include_router(openai_serving.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    app.mount(ui.STATIC_PATH, ui.static_files(), name="ui-static")
    return app

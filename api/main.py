"""The app factory: ``create_app(settings)``; long-lived clients live on ``app.state``, made in ``lifespan``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api import errors
from api.routes import admin, health, jobs, search
from api.service import JobService
from pipeline.settings import Settings, get_settings
from workers.celery_app import client_app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s, health_check_interval=10)
        celery = client_app(settings)
        app.state.jobs = JobService(settings, app.state.redis, celery)
        yield
        celery.close()
        await app.state.redis.aclose()

    app = FastAPI(title="imgsearch", version="0.1.0", lifespan=lifespan,
                  description="Asynchronous text-to-image search over Reddit image posts.")
    errors.install(app)
    for router in (jobs.router, search.router, health.router, admin.router):
        app.include_router(router)
    return app

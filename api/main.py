"""The app factory: ``create_app(settings)``; long-lived clients live on ``app.state``, made in ``lifespan``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from api import errors, job_body, metrics
from api.limits import BodyLimit
from api.routes import admin, health, images, jobs, search
from pipeline import logs
from pipeline.admission import Admission
from pipeline.jobs.recovery import Recovery
from pipeline.jobs.store import AsyncJobStore
from pipeline.settings import Settings, get_api_settings
from pipeline.stores import make_blob_store
from workers.celery_app import SEARCH_TASK, client_app

log = logging.getLogger(__name__)


async def _reap_forever(recovery: Recovery) -> None:
    """Every ``reaper_interval_s``: send stranded jobs again, and end the jobs no worker will end (any API
    process may: ends are conditional, and a job sent twice ends once)."""
    while True:
        await asyncio.sleep(recovery.settings.reaper_interval_s)
        try:
            sent = await recovery.rescue()
            ended = await recovery.reap()
        except Exception as exc:  # noqa: BLE001 - Redis away: try again next round
            log.warning("reaper: %s: %s", type(exc).__name__, exc)
            continue
        if sent:
            metrics.RESCUED.inc(len(sent))
            log.warning("sent %d stranded job(s) again: %s", len(sent), ", ".join(sent[:10]))
        if ended:
            metrics.REAPED.inc(len(ended))
            log.warning("reaper ended %d job(s) past their deadline: %s", len(ended), ", ".join(ended[:10]))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_api_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s, health_check_interval=10)
        celery = app.state.celery = client_app(settings)

        async def send(job_id: str) -> None:
            """The job's task on the search queue (the broker's client blocks: off the event loop)."""
            await anyio.to_thread.run_sync(partial(celery.send_task, SEARCH_TASK, args=[{"job_id": job_id}],
                                                   task_id=job_id, queue=settings.search_queue))

        limits = app.state.redis if not settings.limits_redis_url else aioredis.Redis.from_url(
            settings.limits_redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        app.state.jobs = AsyncJobStore(settings, app.state.redis, send, limits)
        app.state.admission = Admission(settings, app.state.jobs, limits)
        app.state.blobs = make_blob_store(settings)  # images only: the API reads no vector and no feature
        recovery = app.state.recovery = Recovery(app.state.jobs)
        reaper = asyncio.create_task(_reap_forever(recovery)) if settings.reaper_interval_s else None
        yield
        if reaper is not None:
            reaper.cancel()
        celery.close()
        if limits is not app.state.redis:
            await limits.aclose()
        await app.state.redis.aclose()

    app = FastAPI(title="imgsearch", version="0.1.0", lifespan=lifespan,
                  description="Asynchronous text-to-image search over Reddit image posts.")
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       upload_max_bytes=settings.max_upload_bytes + job_body.FORM_SLACK)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Any:
        """Every request has an id (the caller's X-Request-ID when it sends a sane one); logs and jobs carry it."""
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
            rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        with logs.bound(request_id=rid):
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "unmatched"), request.method, response.status_code,
                        time.perf_counter() - t0)
        response.headers["X-Request-ID"] = rid
        return response

    for router in (jobs.router, search.router, images.router, health.router, admin.router):
        app.include_router(router)
    # the page's scripts beside it (the page itself is health.page)
    app.mount("/static", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="static")
    return app

"""The app factory: ``create_app(settings)``; long-lived clients live on ``app.state``, made in ``lifespan``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api import errors, job_body, metrics
from api.lanes import Lanes
from api.limits import BodyLimit, Slots
from api.middleware import RequestContext
from api.routes import admin, explain, health, images, jobs, page, search
from pipeline.admission.admit import Admission
from pipeline.jobs.recovery import Recovery
from pipeline.jobs.store import AsyncJobStore, aconnect
from pipeline.settings import ApiSettings, get_api_settings
from pipeline.stores import make_blob_store
from workers.celery_app import SEARCH_TASK, client_app, send_job

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


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_api_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        pw = settings.redis_sentinel_password  # a Sentinel group's own (redis_url may name one)
        app.state.redis = aconnect(settings.redis_url, settings.redis_socket_timeout_s, sentinel_password=pw,
                                   max_connections=settings.redis_max_connections, name="imgsearch-api")
        # followers (event streams, POST /search's waits) block on a pool of their own: they can't starve the rest
        streams = aconnect(settings.redis_url, settings.redis_socket_timeout_s, sentinel_password=pw,
                           max_connections=settings.stream_pool_size, name="imgsearch-api-streams")
        app.state.streams = Slots(settings.limits.max_streams, settings.limits.stream_max_s + 5)
        celery = app.state.celery = client_app(settings)
        lanes = app.state.lanes = Lanes(settings)

        async def send(job_id: str) -> None:
            """The job's task on the search queue (the broker's client blocks: off the event loop, in its lane)."""
            await lanes.send.run(send_job, celery, SEARCH_TASK, job_id, settings.search_queue)

        limits = app.state.redis if not settings.limits_redis_url else aconnect(
            settings.limits_redis_url, 0.5, sentinel_password=pw, max_connections=settings.redis_max_connections,
            name="imgsearch-api-limits")
        app.state.jobs = AsyncJobStore(settings, app.state.redis, send, limits, streams)
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
        await streams.aclose()
        await app.state.redis.aclose()

    app = FastAPI(title="imgsearch", version="0.1.0", lifespan=lifespan,
                  description="Asynchronous text-to-image search over Reddit image posts.")
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes,
                       upload_max_bytes=settings.limits.max_upload_bytes + job_body.FORM_SLACK,
                       upload_routes=frozenset({("POST", jobs.router.prefix)}))  # the one route that takes a picture
    # outermost of ours: its id, latency and security headers cover the body limit's 413 too
    app.add_middleware(RequestContext)

    for router in (jobs.router, explain.router, search.router, images.router, health.router, page.router,
                   admin.router):
        app.include_router(router)
    # the page's scripts beside it (the page itself is api.routes.page)
    app.mount("/static", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="static")
    return app

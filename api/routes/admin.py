"""Admin endpoints, on only when IMGSEARCH_ADMIN_TOKEN is set and called with it as a bearer token: take a
post down everywhere, start an ingest run. Both go through the queue to the workers that hold the stores."""

from __future__ import annotations

import hmac
import re
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from api.deps import SettingsDep
from api.schemas import ErrorResponse
from pipeline.errors import Forbidden, InvalidRequest, Unavailable
from workers.celery_app import INGEST_TASK, TAKEDOWN_TASK

_POST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    if settings.admin_token is None:
        raise Forbidden("admin endpoints are off: set IMGSEARCH_ADMIN_TOKEN to turn them on")
    want = f"Bearer {settings.admin_token.get_secret_value()}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), want):
        raise Forbidden("admin endpoints need the admin token as 'Authorization: Bearer <token>'")


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(_admin)],
                   responses={403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})


def _send(request: Request, name: str, payload: dict[str, Any], queue: str) -> Any:
    return request.app.state.jobs.celery.send_task(name, args=[payload], queue=queue)


@router.delete("/posts/{post_id}", responses={202: {"description": "queued; the takedown had not ended in time"}})
async def take_down(post_id: str, request: Request, settings: SettingsDep) -> JSONResponse:
    """Remove a post from the vector store, the blobs and the caches; later ingests keep it out."""
    if not _POST_ID.match(post_id):
        raise InvalidRequest("post_id: letters, digits, '_' and '-' only, at most 64")
    try:
        result = await anyio.to_thread.run_sync(partial(_send, request, TAKEDOWN_TASK, {"ids": [post_id]},
                                                        settings.search_queue))
    except Exception as exc:
        raise Unavailable(f"could not enqueue the takedown: {type(exc).__name__}") from exc
    try:
        out = await anyio.to_thread.run_sync(partial(result.get, timeout=settings.search_wait_s, propagate=True))
    except Exception as exc:  # celery's result timeout, or the task failed on the worker
        if type(exc).__name__ == "TimeoutError":
            return JSONResponse({"status": "queued", "task_id": result.id}, status_code=202)
        raise Unavailable(f"the takedown failed: {type(exc).__name__}") from exc
    return JSONResponse({"status": "done", "removed": out["removed"][0]})


@router.post("/ingest", status_code=202)
async def start_ingest(request: Request, settings: SettingsDep, source: str | None = None) -> dict[str, Any]:
    """Start an ingest run now, on the ingest queue (a run already going makes this one end at once)."""
    if source not in (None, "reddit", "folder"):
        raise InvalidRequest("source: reddit or folder")
    try:
        result = await anyio.to_thread.run_sync(partial(_send, request, INGEST_TASK, {"source": source},
                                                        settings.ingest_queue))
    except Exception as exc:
        raise Unavailable(f"could not enqueue the ingest run: {type(exc).__name__}") from exc
    return {"status": "queued", "task_id": result.id}

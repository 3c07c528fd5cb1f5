"""Admin endpoints, for admin API keys only: take a post down everywhere, start an ingest run. Both go through
the queue to the workers that hold the stores."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import AdminCaller, SettingsDep
from api.schemas import ErrorResponse
from pipeline.errors import InvalidRequest, Unavailable
from pipeline.ids import check_post_id
from workers.celery_app import INGEST_TASK, TAKEDOWN_TASK

router = APIRouter(prefix="/v1/admin", tags=["admin"],
                   responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                              429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})


def _send(request: Request, name: str, payload: dict[str, Any], queue: str) -> Any:
    return request.app.state.celery.send_task(name, args=[payload], queue=queue)


@router.delete("/posts/{post_id}", responses={202: {"description": "queued; the takedown had not ended in time"}})
async def take_down(post_id: str, request: Request, settings: SettingsDep, _: AdminCaller) -> JSONResponse:
    """Remove a post from the vector store, the blobs and the caches; later ingests keep it out."""
    check_post_id(post_id)
    try:
        result = await request.app.state.lanes.send.run(_send, request, TAKEDOWN_TASK, {"ids": [post_id]},
                                                        settings.search_queue)
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
async def start_ingest(request: Request, settings: SettingsDep, _: AdminCaller,
                       source: str | None = None) -> dict[str, Any]:
    """Start an ingest run now, on the ingest queue (a run already going makes this one end at once)."""
    if source not in (None, "reddit", "folder"):
        raise InvalidRequest("source: reddit or folder")
    try:
        result = await request.app.state.lanes.send.run(_send, request, INGEST_TASK, {"source": source},
                                                        settings.ingest_queue)
    except Exception as exc:
        raise Unavailable(f"could not enqueue the ingest run: {type(exc).__name__}") from exc
    return {"status": "queued", "task_id": result.id}

"""Liveness and readiness."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pipeline.jobs import HEARTBEAT_PATTERN

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (checks nothing else)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when Redis answers and at least one worker has its engines loaded (its heartbeat is fresh)."""
    r = request.app.state.redis
    body: dict[str, Any] = {"redis": "ok", "workers": []}
    try:
        await r.ping()
        keys = [k async for k in r.scan_iter(match=HEARTBEAT_PATTERN, count=100)]
        beats = await r.mget(keys) if keys else []
        body["workers"] = [json.loads(b) for b in beats if b]
    except Exception as exc:  # any Redis failure means not ready
        body["redis"] = f"down ({type(exc).__name__})"
    queue = request.app.state.settings.search_queue  # ingest workers answer no query
    ready = body["redis"] == "ok" and any(w.get("engines_loaded") and w.get("queue", queue) == queue
                                          for w in body["workers"])
    body["ready"] = ready
    return JSONResponse(body, status_code=200 if ready else 503)

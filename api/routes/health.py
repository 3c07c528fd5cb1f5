"""Liveness, readiness and the metrics (the page is api.routes.page)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import auth, metrics
from pipeline.errors import Forbidden, Unauthorized
from pipeline.jobs import fleet
from pipeline.jobs.queues import queues

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (checks nothing else)."""
    return {"status": "ok"}


def _fleet_viewer(request: Request) -> bool:
    """Whether this request may see the fleet: anyone while the API is open, else an admin or a monitor key (a
    missing or wrong key is no error here: it sees the public answer)."""
    admission = request.app.state.admission
    if admission.open:
        return True
    try:
        return admission.sees_fleet(auth.caller(admission, request))  # type: ignore[no-any-return]
    except Unauthorized:
        return False


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when Redis answers and at least one search worker is live with its engines loaded and its vector
    store answering. Where keys are configured, only an admin or monitor key sees why (the workers, with their
    hosts, PIDs and circuits, and the rate-limit store's state); anyone else gets ``{"ready"}`` and the status a
    load balancer needs. Cheap: a ping and one script over the workers' set, never a keyspace scan."""
    r = request.app.state.redis
    body: dict[str, Any] = {"redis": "ok", "workers": []}
    try:
        await r.ping()
        body["workers"] = await fleet.aread(r)
    except Exception as exc:  # any Redis failure means not ready
        body["redis"] = f"down ({type(exc).__name__})"
    queue = request.app.state.settings.search_queue  # ingest workers answer no query
    ready = body["redis"] == "ok" and any(fleet.serves_search(w, queue) for w in body["workers"])
    if not _fleet_viewer(request):
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
    body["limits"] = await request.app.state.admission.state()
    body["ready"] = ready
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    """Prometheus text format: this API's requests, and the fleet's stage latency, jobs by outcome, cache hits,
    queue depth and live workers (from Redis; left out while Redis is unreachable). Where keys are configured,
    for an admin or monitor key only (401 without a key, 403 with another)."""
    admission = request.app.state.admission
    if not admission.open and not admission.sees_fleet(auth.caller(admission, request)):
        raise Forbidden("/metrics needs a monitor or admin API key")
    s = request.app.state.settings
    try:
        families = await metrics.fleet_families(request.app.state.redis, queues(s))
    except Exception:  # noqa: BLE001 - Redis away: this process's own metrics still go out
        families = []
    return Response(metrics.render(families), media_type="text/plain; version=0.0.4; charset=utf-8")

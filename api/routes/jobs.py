"""Search jobs: submit, poll, stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status
from fastapi.responses import StreamingResponse

from api.contract import params_of
from api.deps import AdmissionDep, CallerDep, Jobs
from api.schemas import ErrorResponse, JobAccepted, JobView, SearchRequest
from pipeline import logs
from pipeline.jobs.store import public

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                            422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                                            503: {"model": ErrorResponse}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_ERRORS)
async def submit(body: SearchRequest, admission: AdmissionDep, caller: CallerDep, response: Response) -> dict[str, Any]:
    """Queue a search; poll ``links.self`` or stream ``links.events`` for its results."""
    job = await admission.admit(caller, *params_of(body), request_id=logs.current().get("request_id"))
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    return {"id": job.id, "status": job.status, "links": {"self": url, "events": f"{url}/events"}}


@router.get("/{job_id}", response_model=JobView, response_model_exclude_none=True,
            responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def get_job(job_id: str, jobs: Jobs, _: CallerDep) -> dict[str, Any]:
    """The job: ``status`` is queued, running, done or failed; ``results`` once done, ``error`` once failed."""
    return public(await jobs.get(job_id))


@router.delete("/{job_id}", status_code=status.HTTP_202_ACCEPTED, response_model=JobView,
               response_model_exclude_none=True,
               responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                          503: {"model": ErrorResponse}})
async def cancel_job(job_id: str, jobs: Jobs, _: CallerDep) -> dict[str, Any]:
    """Cancel a job: a queued one ends ``failed`` with code ``cancelled`` at once; a running one at its next
    stage. 409 if it already ended."""
    return public(await jobs.cancel(job_id))


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"example": 'id: 1764180000123-0\nevent: queued\n'
                                                                          'data: {"id":"3f2a..."}\n\n'}}},
                       401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def job_events(job_id: str, jobs: Jobs, _: CallerDep,
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Server-Sent Events: queued, started, candidates (ANN order), results (reranked), then done or failed.
    A late client gets the whole history first; the stream closes after done or failed."""
    await jobs.get(job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        async for entry in jobs.follow(job_id, last_event_id or "0"):
            if entry is None:
                yield ": keep-alive\n\n"
            else:
                entry_id, name, data = entry
                yield f"id: {entry_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

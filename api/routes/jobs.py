"""Search jobs: submit, poll, stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.contract import params_of
from api.deps import AdmissionDep, CallerDep, Jobs
from api.schemas import ErrorResponse, JobAccepted, JobView, SearchRequest
from pipeline import logs
from pipeline.jobs.store import public
from pipeline.types import Job

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


async def _job(job_id: str, jobs: Jobs, _: CallerDep) -> Job:
    """The job, or 404 before any response starts (a stream cannot change its status once it began)."""
    return await jobs.get(job_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {"example": 'id: 1764180000123-0\nevent: queued\n'
                                                                          'data: {"id":"3f2a..."}\n\n'}}},
                       401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def job_events(job: Annotated[Job, Depends(_job)], jobs: Jobs,
                     last_event_id: Annotated[str | None, Header()] = None) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: queued, started, candidates (ANN order), results (reranked), then done or failed.
    A late client gets the whole history first; the stream closes after done or failed. FastAPI's own SSE
    response sends the keep-alive comments while the job is quiet."""
    async for entry in jobs.follow(job.id, last_event_id or "0"):
        if entry is not None:  # None: a quiet second (the store looked at the record); FastAPI pings on its own
            entry_id, name, data = entry
            yield ServerSentEvent(raw_data=json.dumps(data, separators=(",", ":")), event=name, id=entry_id)

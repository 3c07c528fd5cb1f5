"""Search jobs: submit, poll, stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api import job_body
from api.deps import AdmissionDep, CallerDep, Jobs, PolledCaller, SettingsDep
from api.schemas import ErrorResponse, JobAccepted, JobRequest, JobView
from pipeline import logs
from pipeline.errors import Unavailable
from pipeline.jobs.store import event_id, public
from pipeline.types import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                            422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                                            503: {"model": ErrorResponse}}


# one route, two bodies (api.job_body reads them): documented here since FastAPI declares one
_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    job_body.MULTIPART: {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "The picture to search by (JPEG, PNG, WebP "
                  "or GIF's first frame; IMGSEARCH_MAX_UPLOAD_BYTES, 10 MiB)."},
        "options": {"type": "string", "description": "JSON: the JSON body's options (limit, filter, ...), without "
                    "query, like or image_url."}}}}}}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_ERRORS,
             openapi_extra=_BODY)
async def submit(request: Request, admission: AdmissionDep, caller: CallerDep, jobs: Jobs,
                 response: Response) -> dict[str, Any]:
    """Queue a search; poll ``links.self`` or stream ``links.events`` for its results. JSON: ``query`` (words),
    ``like`` (a post id) or ``image_url``; multipart/form-data: an uploaded ``image``."""
    # a picture costs one more token than words, paid before it is fetched or decoded
    sub = await job_body.read(request, lambda: admission.limit(caller))
    if sub.image is not None:  # stored first: a worker may take the job the moment it is sent
        await jobs.keep_image(sub.job_id, sub.image.jpeg)
    try:
        job = await admission.admit(caller, sub.query, sub.params, request_id=logs.current().get("request_id"),
                                    job_id=sub.job_id)
    except BaseException:
        if sub.image is not None:
            await jobs.drop_image(sub.job_id)
        raise
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    return {"id": job.id, "status": job.status, "links": {"self": url, "events": f"{url}/events"}}


@router.get("/{job_id}", response_model=JobView, response_model_exclude_none=True,
            responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                       503: {"model": ErrorResponse}})
async def get_job(job_id: str, jobs: Jobs, admission: AdmissionDep, caller: PolledCaller) -> dict[str, Any]:
    """The job: ``status`` is queued, running, done or failed; ``results`` once done, ``error`` once failed.
    With keys configured, a key sees its own jobs only (another's answers 404), an admin key every job."""
    return public(admission.check_owner(caller, await jobs.get(job_id)))


@router.delete("/{job_id}", status_code=status.HTTP_202_ACCEPTED, response_model=JobView,
               response_model_exclude_none=True,
               responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                          429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def cancel_job(job_id: str, jobs: Jobs, admission: AdmissionDep, caller: PolledCaller) -> dict[str, Any]:
    """Cancel a job: a queued one ends ``failed`` with code ``cancelled`` at once; a running one at its next
    stage. 409 if it already ended; 404 if it is another key's."""
    admission.check_owner(caller, await jobs.get(job_id))
    return public(await jobs.cancel(job_id))


async def _stream(job_id: str, jobs: Jobs, admission: AdmissionDep, caller: CallerDep, request: Request,
                  last_event_id: Annotated[str | None, Header()] = None) -> AsyncIterator[tuple[Job, str]]:
    """The job and where its stream starts, with a place among the streams held for as long as it lasts; or the
    refusal before any response starts (a stream cannot change its status once it began): 422 for a bad
    Last-Event-ID, 404 for a job unknown or not the caller's, 429 past the caller's rate limit or its streams,
    503 past this process's streams."""
    after = event_id(last_event_id)
    job = admission.check_owner(caller, await jobs.get(job_id))
    slots = request.app.state.streams
    slot = slots.take()
    if slot is None:
        raise Unavailable(f"{slots.size} event streams are open on this server; retry shortly or poll the job",
                          code="too_many_streams")
    try:
        token = await admission.open_stream(caller)
    except BaseException:
        slots.give(slot)
        raise
    try:
        yield job, after
    finally:  # after the stream's response ended, however it ended
        slots.give(slot)
        await admission.close_stream(caller, token)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {"example": 'id: 1764180000123-0\nevent: queued\n'
                                                                          'data: {"id":"3f2a..."}\n\n'}}},
                       401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                       429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def job_events(stream: Annotated[tuple[Job, str], Depends(_stream)], jobs: Jobs,
                     settings: SettingsDep) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: queued, started, candidates (ANN order), results (reranked), then done or failed.
    A late client gets the whole history first (or what came after its ``Last-Event-ID``); the stream closes
    after done or failed, at once for a job that already ended, and after IMGSEARCH_STREAM_MAX_S (300 s) in any
    case (reconnect with Last-Event-ID). FastAPI's own SSE response sends the keep-alive comments while the job
    is quiet."""
    job, after = stream
    until = time.monotonic() + settings.limits.stream_max_s
    async for entry in jobs.follow(job.id, after):
        if time.monotonic() > until:
            return
        if entry is not None:  # None: a quiet second (the store looked at the record); FastAPI pings on its own
            entry_id, name, data = entry
            yield ServerSentEvent(raw_data=json.dumps(data, separators=(",", ":")), event=name, id=entry_id)

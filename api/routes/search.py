"""The original service's blocking endpoint, kept for its clients; it runs through the same queue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import GuardDep, Jobs, LimitedCaller, SettingsDep
from api.schemas import ErrorResponse, LegacySearchResponse, SearchRequest
from api.service import enqueue
from pipeline.errors import Conflict, DeadlineExceeded, ImgSearchError, InvalidRequest, Unavailable

router = APIRouter(tags=["search"])


@router.post("/search", response_model=LegacySearchResponse,
             responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                        409: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def search(body: SearchRequest, jobs: Jobs, settings: SettingsDep, guard: GuardDep,
                 caller: LimitedCaller) -> dict[str, Any]:
    """Search and wait for the ranking: ``{"results": [[post_id, score], ...]}``, best first."""
    job = await enqueue(jobs, guard, caller, body.query, body.model_dump(exclude={"query"}, exclude_unset=True))
    done = await jobs.wait(job.id, settings.search_wait_s)
    if done is None:
        raise DeadlineExceeded(f"job {job.id} did not finish within {settings.search_wait_s:g} s; "
                               f"poll /v1/jobs/{job.id} for it", code="timeout")
    if done.status == "failed":
        err = done.error
        code, message = (err.code, err.message) if err else ("search_failed", "the search failed")
        # the job's reason, with its own status: a deadline is a 504, a cancellation a 409, a store that is
        # down a 503, the rest 500
        kind = {"deadline_exceeded": DeadlineExceeded, "cancelled": Conflict, "invalid_request": InvalidRequest}.get(
            code, Unavailable if code.endswith("unavailable") else ImgSearchError)
        raise kind(message, code=code)
    return {"results": [[r.id, r.score] for r in done.results or []]}

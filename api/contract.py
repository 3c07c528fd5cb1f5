"""The original service's ``POST /search`` contract, written once for every edge (the API's route, the Cloud
Function, the Modal endpoint): a body -> a job -> ``{"results": [[post_id, score], ...]}``, and a failed or
late job -> the error and HTTP status it answers with."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.schemas import SearchRequest
from pipeline.errors import (
    Conflict,
    DeadlineExceeded,
    Forbidden,
    ImgSearchError,
    InvalidRequest,
    NotFound,
    RateLimited,
    Rejected,
    Unauthorized,
    Unavailable,
)
from pipeline.types import Job, Result

# an error's HTTP status, by class (the first that matches; anything else is a 500)
STATUS: dict[type[ImgSearchError], int] = {InvalidRequest: 422, Unauthorized: 401, Forbidden: 403, NotFound: 404,
                                          Conflict: 409, RateLimited: 429, Unavailable: 503, DeadlineExceeded: 504}


def status_of(exc: ImgSearchError) -> int:
    return next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)


def headers_of(exc: ImgSearchError) -> dict[str, str] | None:
    """Retry-After on 429 and 503, the auth scheme on 401."""
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="imgsearch"'}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    return {"Retry-After": "1"} if status_of(exc) == 503 else None


def error_body(exc: ImgSearchError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


def request_of(body: Any) -> tuple[str, dict[str, Any]]:
    """The query and the job's params of a JSON body (edges without FastAPI's validation); InvalidRequest
    naming the first problem."""
    try:
        req = SearchRequest.model_validate(body if isinstance(body, dict) else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}") from None
    return params_of(req)


def params_of(req: SearchRequest) -> tuple[str, dict[str, Any]]:
    return req.query, req.model_dump(exclude={"query"}, exclude_unset=True)


def results_body(results: list[Result] | None) -> dict[str, Any]:
    return {"results": [[r.id, r.score] for r in results or []]}


def answer(job_id: str, done: Job | None, waited_s: float) -> dict[str, Any]:
    """The body for a job waited on: its ranking, or the error its end (or its lateness) maps to."""
    if done is None:
        raise DeadlineExceeded(f"job {job_id} did not finish within {waited_s:g} s; poll /v1/jobs/{job_id} for it",
                               code="timeout")
    if done.status == "failed":
        err = done.error
        code, message = (err.code, err.message) if err else ("search_failed", "the search failed")
        # the job's reason, with its own status: a deadline is a 504, a cancellation a 409, a store that is
        # down a 503, a request the vector store refused (the caller's mistake) a 422, the rest 500
        kind = {"deadline_exceeded": DeadlineExceeded, "cancelled": Conflict, "invalid_request": InvalidRequest}.get(
            code, Unavailable if code.endswith("unavailable") else Rejected if code.endswith("rejected") else ImgSearchError)
        raise kind(message, code=code)
    return results_body(done.results)

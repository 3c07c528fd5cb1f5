"""The original service's ``POST /search`` contract, written once for every edge (the API's route, the Cloud
Function, the Modal endpoint): a body -> a job -> ``{"results": [[post_id, score], ...]}``, and a failed or
late job -> the error it answers with (its class carries the HTTP status: api.errors answers it)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.schemas import SearchRequest
from pipeline.errors import INTERNAL, DeadlineExceeded, InvalidRequest, job_failure
from pipeline.types import Job, Result


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
        # the job's reason, with its own status: a deadline is a 504, a cancellation a 409, a store that is
        # down a 503, a request the vector store refused (the caller's mistake) a 422, the rest 500
        err = done.error
        raise job_failure(err.code, err.message) if err else job_failure(INTERNAL, "the search failed")
    return results_body(done.results)

"""The original service's blocking endpoint, kept for its clients; it runs through the same queue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import contract
from api.deps import AdmissionDep, CallerDep, Jobs, SettingsDep
from api.schemas import ErrorResponse, LegacySearchResponse, SearchRequest
from pipeline import logs

router = APIRouter(tags=["search"])


@router.post("/search", response_model=LegacySearchResponse,
             responses={401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                        409: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def search(body: SearchRequest, jobs: Jobs, settings: SettingsDep, admission: AdmissionDep,
                 caller: CallerDep) -> dict[str, Any]:
    """Search and wait for the ranking: ``{"results": [[post_id, score], ...]}``, best first."""
    job = await admission.admit(caller, *contract.params_of(body), request_id=logs.current().get("request_id"))
    return contract.answer(job.id, await jobs.wait(job.id, settings.search_wait_s), settings.search_wait_s)

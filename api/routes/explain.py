"""Why a result matched: ``GET /v1/jobs/{id}/explain/{post_id}``, the map of where BLIP's ITM looked in the
post's image for the job's words, as JSON or as a PNG overlay on the stored image. A worker computes it
(``pipeline/search/explain.py``; the API loads no model); the route checks what it can first: the caller's own job
(another key's answers 404, as every job route), done (else 409), the post among its results (else 404)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response

from api.deps import AdmissionDep, CallerDep, Jobs, SettingsDep
from api.schemas import ErrorResponse
from pipeline.errors import Conflict, ImgSearchError, InvalidRequest, NotFound, Unavailable
from pipeline.layout import image_key
from pipeline.search.explain import EXPLAIN_TASK, overlay_png, text_query

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _wait(request: Request, settings: Any, job_id: str, post_id: str) -> dict[str, Any]:
    """The worker's explanation of one post (the broker's client blocks: run off the event loop)."""
    celery = request.app.state.celery
    result = celery.send_task(EXPLAIN_TASK, args=[{"job_id": job_id, "post_ids": [post_id]}],
                              queue=settings.search_queue)
    try:
        out: dict[str, Any] = result.get(timeout=settings.job_deadline_s, propagate=True)
    except ImgSearchError:
        raise
    except Exception as exc:  # no worker answered in time, or the task failed
        raise Unavailable(f"no explanation: {type(exc).__name__}") from exc
    finally:
        result.forget()
    return out[post_id]  # type: ignore[no-any-return]


@router.get("/{job_id}/explain/{post_id}",
            responses={200: {"content": {"application/json": {}, "image/png": {}},
                             "description": "{grid, layer, method} (grid: n x n weights summing to 1), or for an "
                                            "image query {available: false, reason}; PNG: the overlay"},
                       401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                       422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def explain(job_id: str, post_id: str, request: Request, jobs: Jobs, admission: AdmissionDep,
                  caller: CallerDep, settings: SettingsDep,
                  format: Annotated[Literal["json", "png"], Query()] = "json") -> Any:  # noqa: A002 - the API's name
    """Where the reranker looked in the post's image for this job's words. An image query (like, upload) answers
    ``available: false`` with the reason (it has no text-to-image map); its PNG is 422. Costs a rate-limit token,
    like a thumbnail."""
    job = admission.check_owner(caller, await jobs.get(job_id))
    if job.status != "done":
        raise Conflict(f"job {job_id} is {job.status}: explanations exist once it is done")
    if post_id not in {r.id for r in job.results or []}:
        raise NotFound(f"post {post_id} is not among job {job_id}'s results")
    await admission.limit(caller)  # a whole token, as a thumbnail made on demand
    heatmap = await anyio.to_thread.run_sync(partial(_wait, request, settings, job_id, post_id))
    if format == "json":
        return heatmap
    if text_query(job) is None:
        raise InvalidRequest(heatmap["reason"], code="no_text_map")
    try:
        image = await anyio.to_thread.run_sync(partial(request.app.state.blobs.get, image_key(post_id, "jpg")))
    except Exception as exc:
        raise Unavailable(f"the image store is unreachable: {type(exc).__name__}") from exc
    if image is None:
        raise NotFound(f"post {post_id}'s image is gone")
    png = await anyio.to_thread.run_sync(partial(overlay_png, image, heatmap))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

"""Running one queued job through the Searcher, to its one end (what a worker's search task calls)."""

from __future__ import annotations

import logging
import time

from pipeline import image_query, logs, metrics
from pipeline.errors import Cancelled, DeadlineExceeded, InvalidRequest, NotFound, Unavailable, describe, public_error
from pipeline.jobs.keys import TERMINAL
from pipeline.jobs.store import JobStore, failed_event
from pipeline.search import Searcher
from pipeline.types import ErrorInfo, Job, Match, SearchParams

log = logging.getLogger(__name__)


def run_job(job_id: str, searcher: Searcher, store: JobStore) -> Job | None:
    """Run one queued job to its end state. Safe to run again for the same id (redelivery): a job that
    already ended is left as it is, and of two runs of one job only the first to end writes its end."""
    job = store.load(job_id)
    if job is None:
        log.warning("job %s has no record (expired or never created); skipping", job_id)
        return None
    with logs.bound(job_id=job_id, request_id=job.request_id):
        if job.status in TERMINAL:
            log.info("job %s already %s; skipping redelivery", job_id, job.status)
            store.release(job)
            return job
        try:
            ended = _run(job, searcher, store)
        finally:
            store.release(job)
        if ended is not None:
            metrics.record_job(store.r, ended.status, ended.timings, ended.stats, kind=kind_of(ended))
            return ended
        log.info("job %s ended elsewhere (cancelled, reaped or run twice); this run's end is dropped", job_id)
        return store.load(job_id)


def kind_of(job: Job) -> str:
    """text, like or image (the label the fleet's metrics carry); text for params that are no search."""
    try:
        return SearchParams.model_validate({"query": job.query, **job.params}).kind
    except ValueError:  # pydantic's ValidationError is one
        return "text"


def end_empty(job_id: str, store: JobStore) -> None:
    """End a job at once with no results, through the same writes as a search (the queue's own cost)."""
    job = store.load(job_id)
    if job is not None:
        job.status, job.results, job.finished_at = "done", [], time.time()
        store.write(job, ("done", {"id": job.id}))


def _run(job: Job, searcher: Searcher, store: JobStore) -> Job | None:
    """The job run to its end, or None if it had already ended elsewhere (nothing of this run is kept)."""
    job_id = job.id
    job.status, job.started_at, job.worker = "running", time.time(), store.worker
    if not store.write(job, ("started", {"id": job_id})):
        return None
    try:
        # inside the try: a record whose params are not a search (written by hand, or by an older version) ends
        # failed with a code, instead of leaving the job "running" for the reaper
        params = SearchParams.model_validate({"query": job.query, **job.params})
        if job.deadline_at is not None and time.time() > job.deadline_at:
            raise DeadlineExceeded("the job's deadline passed while it was queued")

        def on_candidates(cands: list[Match]) -> None:
            store.event(job_id, "candidates", {"candidates": [m.model_dump(mode="json") for m in cands]})

        t0 = time.perf_counter()
        image = image_query.picture(store.image(job_id), params.image, searcher.settings.fetch.max_pixels) \
            if params.image else None
        outcome = searcher.search(params, deadline=job.deadline_at, on_candidates=on_candidates,
                                  cancelled=lambda: store.cancelled(job_id), image=image, owner=job.owner)
        if store.cancelled(job_id):  # cancelled during the last stage: the client asked not to get it
            raise Cancelled("cancelled by the client while it ran")
        if params.explain:
            from pipeline.explain import explain_results

            t1 = time.perf_counter()
            explain_results(params, outcome.results, searcher)
            outcome.timings = {**outcome.timings, "explain": round((time.perf_counter() - t1) * 1000, 3)}
        job.timings = {**outcome.timings, "total": round((time.perf_counter() - t0) * 1000, 3),
                       "queue_wait": round((job.started_at - job.created_at) * 1000, 3)}
        job.results, job.not_reranked, job.stats = outcome.results, outcome.not_reranked, outcome.stats
        job.degraded = bool(outcome.not_reranked) or None
        job.status, job.finished_at = "done", time.time()
        if not store.write(job, ("results", {"results": [r.model_dump(mode="json") for r in outcome.results],
                                             "not_reranked": outcome.not_reranked}),
                           ("done", {"id": job_id, "timings": job.timings})):
            return None
        log.info("job %s done in %.0f ms (%d results%s)", job_id, job.timings["total"], len(outcome.results),
                 f", {len(outcome.not_reranked)} not reranked" if outcome.not_reranked else "")
    except Exception as exc:  # every failure ends the job with a reason; nothing is left "running"
        # the public record gets a stable code and a safe message; the internals go to the log, by job id
        code, message = public_error(exc)
        if isinstance(exc, Cancelled | DeadlineExceeded | Unavailable | InvalidRequest | NotFound):
            log.warning("job %s failed (%s): %s", job_id, code, describe(exc))
        else:
            log.exception("job %s failed (%s): %s", job_id, code, describe(exc))
        job.status, job.finished_at = "failed", time.time()
        job.error = ErrorInfo(code=code, message=message)
        if not store.write(job, failed_event(job)):
            return None
    return job

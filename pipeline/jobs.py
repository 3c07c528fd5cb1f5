"""Job records and event streams in Redis, shared by the API (async client) and the workers (sync client).

A job is a JSON record under ``imgsearch:job:{id}`` and a Redis Stream of events under
``imgsearch:job:{id}:events``; both expire with the job. The ``stage_*`` helpers only queue commands on a
redis-py pipeline, so the same code serves ``redis.Redis`` and ``redis.asyncio.Redis``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from pipeline import logs, metrics
from pipeline.errors import Cancelled, DeadlineExceeded, ImgSearchError
from pipeline.search import Searcher
from pipeline.types import ErrorInfo, Job, Match, SearchParams

log = logging.getLogger(__name__)

PREFIX = "imgsearch"
TERMINAL = ("done", "failed")


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:cancel"


def heartbeat_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"


def stage_record(pipe: Any, job: Job, ttl: int) -> None:
    pipe.set(job_key(job.id), job.model_dump_json(exclude_none=True), ex=ttl)


def stage_event(pipe: Any, job_id: str, name: str, data: dict[str, Any], ttl: int, maxlen: int) -> None:
    pipe.xadd(events_key(job_id), {"event": name, "data": json.dumps(data, separators=(",", ":"))},
              maxlen=maxlen, approximate=True)
    pipe.expire(events_key(job_id), ttl)


def parse_job(raw: bytes | str | None) -> Job | None:
    return None if raw is None else Job.model_validate_json(raw)


def parse_events(entries: list[tuple[Any, dict[Any, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(stream id, event name, data)`` for each entry of an XRANGE/XREAD answer."""
    out = []
    for entry_id, fields in entries:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, f["event"], json.loads(f["data"])))
    return out


def public(job: Job) -> dict[str, Any]:
    """The job as clients see it: ``{"id", "status", "query", "results"?, "error"?, "timings"?}`` and a few extras."""
    return job.model_dump(mode="json", exclude_none=True, exclude={"inflight_key"})


class JobWriter:
    """The worker's side: moves a job through running -> done/failed and appends its events."""

    def __init__(self, client: redis.Redis, ttl: int, maxlen: int, limits: redis.Redis | None = None) -> None:
        self.r, self.ttl, self.maxlen = client, ttl, maxlen
        self.limits = limits or client  # where the API counts each caller's jobs in flight

    def cancelled(self, job_id: str) -> bool:
        try:
            return bool(self.r.exists(cancel_key(job_id)))
        except redis.RedisError:  # can't tell: carry on (the deadline still bounds the job)
            return False

    def release(self, job: Job) -> None:
        """The job no longer counts against its caller's cap (best effort: the entry also expires)."""
        if job.inflight_key:
            try:
                self.limits.zrem(job.inflight_key, job.id)
            except redis.RedisError as exc:
                log.warning("could not release job %s from %s: %s", job.id, job.inflight_key, exc)

    def load(self, job_id: str) -> Job | None:
        return parse_job(self.r.get(job_key(job_id)))

    def write(self, job: Job, event: str | None = None, data: dict[str, Any] | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        stage_record(pipe, job, self.ttl)
        if event:
            stage_event(pipe, job.id, event, data or {}, self.ttl, self.maxlen)
        pipe.execute()

    def event(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        stage_event(pipe, job_id, event, data, self.ttl, self.maxlen)
        pipe.execute()


def run_job(job_id: str, searcher: Searcher, writer: JobWriter) -> Job | None:
    """Run one queued job to its end state. Safe to run again for the same id (redelivery): a job that
    already ended is left as it is, and a rerun writes the same kind of record."""
    job = writer.load(job_id)
    if job is None:
        log.warning("job %s has no record (expired or never created); skipping", job_id)
        return None
    with logs.bound(job_id=job_id, request_id=job.request_id):
        if job.status in TERMINAL:
            log.info("job %s already %s; skipping redelivery", job_id, job.status)
            writer.release(job)
            return job
        try:
            return _run(job, searcher, writer)
        finally:
            writer.release(job)
            if job.status in TERMINAL:
                metrics.record_job(writer.r, job.status, job.timings, job.stats)


def _run(job: Job, searcher: Searcher, writer: JobWriter) -> Job:
    job_id = job.id
    job.status, job.started_at = "running", time.time()
    writer.write(job, "started", {"id": job_id})
    params = SearchParams.model_validate({"query": job.query, **job.params})
    try:
        if job.deadline_at is not None and time.time() > job.deadline_at:
            raise DeadlineExceeded("the job's deadline passed while it was queued")

        def on_candidates(cands: list[Match]) -> None:
            writer.event(job_id, "candidates", {"candidates": [m.model_dump(mode="json") for m in cands]})

        t0 = time.perf_counter()
        outcome = searcher.search(params, deadline=job.deadline_at, on_candidates=on_candidates,
                                  cancelled=lambda: writer.cancelled(job_id))
        if writer.cancelled(job_id):  # cancelled during the last stage: the client asked not to get it
            raise Cancelled("cancelled by the client while it ran")
        job.timings = {**outcome.timings, "total": round((time.perf_counter() - t0) * 1000, 3),
                       "queue_wait": round((job.started_at - job.created_at) * 1000, 3)}
        job.results, job.not_reranked, job.stats = outcome.results, outcome.not_reranked, outcome.stats
        writer.event(job_id, "results", {"results": [r.model_dump(mode="json") for r in outcome.results],
                                         "not_reranked": outcome.not_reranked})
        job.status, job.finished_at = "done", time.time()
        writer.write(job, "done", {"id": job_id, "timings": job.timings})
        log.info("job %s done in %.0f ms (%d results)", job_id, job.timings["total"], len(outcome.results))
    except Exception as exc:  # every failure ends the job with a reason; nothing is left "running"
        code = exc.code if isinstance(exc, ImgSearchError) else "search_failed"
        message = exc.message if isinstance(exc, ImgSearchError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Cancelled):
            log.info("job %s cancelled", job_id)
        else:
            log.exception("job %s failed: %s", job_id, message)
        job.status, job.finished_at = "failed", time.time()
        job.error = ErrorInfo(code=code, message=message)
        writer.write(job, "failed", {"id": job_id, "error": job.error.model_dump()})
    return job

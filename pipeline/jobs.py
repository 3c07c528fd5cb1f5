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
from pipeline.errors import Cancelled, DeadlineExceeded, ImgSearchError, Unavailable
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


# every job that has not ended, scored by its deadline: what the reaper walks
OPEN_KEY = f"{PREFIX}:jobs:open"


def heartbeat_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"


# Writes a job's record and appends its events, unless the job already ended: the first end wins, so a job run
# twice (redelivered while its first worker still ran, cancelled or reaped meanwhile) ends once, with one set of
# results. A job that ends leaves the open set; a new one joins it, scored by its deadline.
# KEYS: record, events, open set. ARGV: record JSON, ttl, maxlen, create ("1": the record must not exist yet,
# "0": it must), job id, deadline ("" for none), then event name and data pairs. Returns 1 if written, else 0.
WRITE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if ARGV[4] == '1' then
  if cur then return 0 end
else
  if not cur then return 0 end
  local st = cjson.decode(cur)['status']
  if st == 'done' or st == 'failed' then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for i = 7, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[i], 'data', ARGV[i + 1])
end
if #ARGV >= 7 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
local st = cjson.decode(ARGV[1])['status']
if st == 'done' or st == 'failed' then
  redis.call('ZREM', KEYS[3], ARGV[5])
elseif ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
end
return 1
"""


# Appends one event to a job that has not ended (a second run of an ended job adds nothing to its stream).
EVENT_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local st = cjson.decode(cur)['status']
if st == 'done' or st == 'failed' then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


def write_args(job: Job, events: list[tuple[str, dict[str, Any]]], ttl: int, maxlen: int,
               create: bool = False) -> tuple[list[str], list[Any]]:
    """Keys and arguments of one WRITE_SCRIPT call (run by the API's async client or a worker's sync one)."""
    args: list[Any] = [job.model_dump_json(exclude_none=True), ttl, maxlen, "1" if create else "0", job.id,
                       "" if job.deadline_at is None or job.status in TERMINAL else repr(job.deadline_at)]
    for name, data in events:
        args += [name, json.dumps(data, separators=(",", ":"))]
    return [job_key(job.id), events_key(job.id), OPEN_KEY], args


def resent_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:resent"


def reaped(job: Job) -> Job:
    """The job as the reaper ends it: no worker finished it by its deadline (all of them dead, or the queue
    lost it)."""
    job.status, job.finished_at = "failed", time.time()
    job.error = ErrorInfo(code="deadline_exceeded", message="no worker finished the job by its deadline")
    return job


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
    return job.model_dump(mode="json", exclude_none=True, exclude={"inflight_key", "worker"})


class JobWriter:
    """The worker's side: moves a job through running -> done/failed and appends its events."""

    def __init__(self, client: redis.Redis, ttl: int, maxlen: int, limits: redis.Redis | None = None,
                 retry_s: float = 15.0, worker: str | None = None) -> None:
        self.r, self.ttl, self.maxlen, self.retry_s = client, ttl, maxlen, retry_s
        self.worker = worker  # this process's heartbeat name, written into the jobs it runs
        self.limits = limits or client  # where the API counts each caller's jobs in flight
        self._write = client.register_script(WRITE_SCRIPT)
        self._event = client.register_script(EVENT_SCRIPT)

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

    def write(self, job: Job, *events: tuple[str, dict[str, Any]], create: bool = False) -> bool:
        """Write the record and its events at once; False (nothing written) if the job already ended."""
        keys, args = write_args(job, list(events), self.ttl, self.maxlen, create=create)
        give_up, wait = time.monotonic() + self.retry_s, 0.1
        while True:  # Redis restarting: the end of a job that ran is worth a few seconds' wait
            try:
                return bool(self._write(keys=keys, args=args))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + wait > give_up:
                    raise
                log.warning("job %s: Redis unreachable (%s); writing again in %.1f s", job.id, exc, wait)
                time.sleep(wait)
                wait = min(wait * 2, 2.0)

    def event(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        """A progress event (best effort: the end's record and events carry everything a client needs)."""
        try:
            self._event(keys=[job_key(job_id), events_key(job_id)],
                        args=[event, json.dumps(data, separators=(",", ":")), self.maxlen, self.ttl])
        except redis.RedisError as exc:
            log.warning("job %s: %s event not written: %s", job_id, event, exc)


def run_job(job_id: str, searcher: Searcher, writer: JobWriter) -> Job | None:
    """Run one queued job to its end state. Safe to run again for the same id (redelivery): a job that
    already ended is left as it is, and of two runs of one job only the first to end writes its end."""
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
            ended = _run(job, searcher, writer)
        finally:
            writer.release(job)
        if ended is not None:
            metrics.record_job(writer.r, ended.status, ended.timings, ended.stats)
            return ended
        log.info("job %s ended elsewhere (cancelled, reaped or run twice); this run's end is dropped", job_id)
        return writer.load(job_id)


def _run(job: Job, searcher: Searcher, writer: JobWriter) -> Job | None:
    """The job run to its end, or None if it had already ended elsewhere (nothing of this run is kept)."""
    job_id = job.id
    job.status, job.started_at, job.worker = "running", time.time(), writer.worker
    if not writer.write(job, ("started", {"id": job_id})):
        return None
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
        job.degraded = bool(outcome.not_reranked) or None
        job.status, job.finished_at = "done", time.time()
        if not writer.write(job, ("results", {"results": [r.model_dump(mode="json") for r in outcome.results],
                                              "not_reranked": outcome.not_reranked}),
                            ("done", {"id": job_id, "timings": job.timings})):
            return None
        log.info("job %s done in %.0f ms (%d results%s)", job_id, job.timings["total"], len(outcome.results),
                 f", {len(outcome.not_reranked)} not reranked" if outcome.not_reranked else "")
    except Exception as exc:  # every failure ends the job with a reason; nothing is left "running"
        code = exc.code if isinstance(exc, ImgSearchError) else "search_failed"
        message = exc.message if isinstance(exc, ImgSearchError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Cancelled | DeadlineExceeded | Unavailable):
            log.warning("job %s failed: %s", job_id, message)
        else:
            log.exception("job %s failed: %s", job_id, message)
        job.status, job.finished_at = "failed", time.time()
        job.error = ErrorInfo(code=code, message=message)
        if not writer.write(job, ("failed", {"id": job_id, "error": job.error.model_dump()})):
            return None
    return job


def new_job(settings: Any, query: str, params: dict[str, Any], *, request_id: str | None = None,
            inflight_key: str | None = None) -> Job:
    """A queued job's record: its own ``deadline_s`` (capped by the server's) taken out of its params."""
    import uuid

    params = dict(params)
    wanted = params.pop("deadline_s", None)
    now = time.time()
    return Job(id=uuid.uuid4().hex, status="queued", query=query,
               params={k: v for k, v in params.items() if v is not None}, created_at=now,
               deadline_at=now + (min(wanted, settings.job_deadline_s) if wanted else settings.job_deadline_s),
               request_id=request_id, inflight_key=inflight_key)


def submit_blocking(r: redis.Redis, celery: Any, settings: Any, query: str, params: dict[str, Any]) -> Job:
    """Queue a search job from a synchronous client (the Cloud Function), as the API does: the record and its
    first event written at once, then the task sent; the record removed again if the broker refused it."""
    from workers.celery_app import SEARCH_TASK

    job = new_job(settings, query, params)
    keys, args = write_args(job, [("queued", {"id": job.id})], settings.job_ttl_s, settings.events_maxlen, create=True)
    r.register_script(WRITE_SCRIPT)(keys=keys, args=args)
    try:
        celery.send_task(SEARCH_TASK, args=[{"job_id": job.id}], task_id=job.id, queue=settings.search_queue)
    except Exception:
        r.delete(job_key(job.id), events_key(job.id))
        r.zrem(OPEN_KEY, job.id)
        raise
    return job


def wait_blocking(r: redis.Redis, job_id: str, timeout: float) -> Job | None:
    """The job once it ended (following its event stream), or None after ``timeout`` seconds."""
    until, last = time.monotonic() + timeout, "0"
    while (left := until - time.monotonic()) > 0:
        got = r.xread({events_key(job_id): last}, block=max(1, int(min(left, 1.0) * 1000)), count=100)
        for entry_id, name, _ in parse_events(got[0][1] if got else []):  # type: ignore[index, arg-type]
            last = entry_id
            if name in TERMINAL:
                return parse_job(r.get(job_key(job_id)))
    return None

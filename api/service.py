"""The API's one long-lived helper: submits jobs, reads them back and follows their event streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery

from api.security import Caller, Guard
from pipeline import filters, logs
from pipeline.errors import Conflict, InvalidRequest, NotFound, Unavailable
from pipeline.jobs import (
    OPEN_KEY,
    TERMINAL,
    WRITE_SCRIPT,
    cancel_key,
    events_key,
    heartbeat_key,
    job_key,
    new_job,
    parse_events,
    parse_job,
    reaped,
    resent_key,
    write_args,
)
from pipeline.settings import Settings
from pipeline.types import ErrorInfo, Job
from workers.celery_app import SEARCH_TASK

KEEPALIVE = None  # yielded by ``follow`` when nothing happened for a while
_BLOCK_MS = 1000


class JobService:
    def __init__(self, settings: Settings, redis: aioredis.Redis, celery: Celery) -> None:
        self.settings, self.redis, self.celery = settings, redis, celery
        self._write_script = redis.register_script(WRITE_SCRIPT)
        self._stranded_since: dict[str, float] = {}  # job id -> when this process first saw it stranded

    async def _write(self, job: Job, *events: tuple[str, dict[str, Any]], create: bool = False) -> bool:
        """The record and events at once, unless the job already ended (see pipeline.jobs.WRITE_SCRIPT)."""
        keys, args = write_args(job, list(events), self.settings.job_ttl_s, self.settings.events_maxlen, create)
        return bool(await self._write_script(keys=keys, args=args))

    async def _send(self, job_id: str) -> None:
        """The job's task on the search queue (the broker's client blocks: off the event loop)."""
        send = partial(self.celery.send_task, SEARCH_TASK, args=[{"job_id": job_id}], task_id=job_id,
                       queue=self.settings.search_queue)
        await anyio.to_thread.run_sync(send)

    async def submit(self, query: str, params: dict[str, Any], *, request_id: str | None = None,
                     inflight_key: str | None = None) -> Job:
        if len(query) > self.settings.max_query_chars:
            raise InvalidRequest(f"the query is {len(query)} characters long; the limit is {self.settings.max_query_chars}")
        filters.for_search(params.get("filter"))  # refused here, not later in the worker
        cap = self.settings.max_queue_length
        if cap and await self.redis.llen(self.settings.search_queue) >= cap:
            raise Unavailable(f"the search queue is full ({cap} jobs waiting); retry shortly", code="queue_full")
        job = new_job(self.settings, query, params, request_id=request_id, inflight_key=inflight_key)
        await self._write(job, ("queued", {"id": job.id}), create=True)
        try:
            await self._send(job.id)
        except Exception as exc:  # the broker is unreachable: don't leave a job that will never run
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.delete(job_key(job.id), events_key(job.id))
                pipe.zrem(OPEN_KEY, job.id)
                await pipe.execute()
            except Exception:  # noqa: BLE001 - Redis away too: the reaper ends the record at its deadline
                pass
            raise Unavailable(f"could not enqueue the job: {type(exc).__name__}") from exc
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job: a queued one ends ``failed`` (code ``cancelled``) at once and no
        worker runs it; a running one ends so at its next stage boundary. An ended job is a conflict."""
        job = await self.get(job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already ended ({job.status})")
        await self.redis.set(cancel_key(job_id), b"1", ex=self.settings.job_ttl_s)
        if job.status == "queued":
            job.status, job.finished_at = "failed", time.time()
            job.error = ErrorInfo(code="cancelled", message="cancelled by the client before it ran")
            if not await self._write(job, ("failed", {"id": job_id, "error": job.error.model_dump()})):
                raise Conflict(f"job {job_id} ended before it could be cancelled")
            if job.inflight_key:
                await self.redis.zrem(job.inflight_key, job_id)
        return job

    async def rescue(self, now: float | None = None) -> list[str]:
        """Send again the open jobs no worker will otherwise run before their deadline: queued for
        ``rescue_after_s`` while the queue is empty (their message was lost, e.g. in flight to a worker when
        Redis stopped), or running on a worker whose heartbeat expired (it died; its message comes back only
        after the visibility timeout, past the deadline). A job sent twice still ends once (the first end
        wins), so a wrong guess costs one wasted run, never a second result."""
        now = now or time.time()
        s = self.settings
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in await self.redis.zrangebyscore(OPEN_KEY, now, "+inf", start=0, num=2000)]
        if not ids or not s.rescue_max:
            return []
        queue_empty = await self.redis.llen(s.search_queue) == 0
        jobs = [parse_job(raw) for raw in await self.redis.mget([job_key(i) for i in ids])]
        seen: dict[str, float] = {}
        for job in jobs:
            if job is None or job.status in TERMINAL:
                continue
            # queued with nothing left in the queue: its message is held by a worker (about to start it) or lost;
            # only one still so after rescue_after_s counts
            if (job.status == "queued" and queue_empty) or (
                    job.status == "running" and job.worker and not await self.redis.exists(heartbeat_key(job.worker))):
                seen[job.id] = self._stranded_since.get(job.id, now)
        self._stranded_since = seen
        sent = []
        for job_id in [j for j, since in seen.items() if now - since >= s.rescue_after_s]:
            del self._stranded_since[job_id]
            n = await self.redis.incr(resent_key(job_id))
            await self.redis.expire(resent_key(job_id), s.job_ttl_s)
            if n > s.rescue_max:
                continue
            await self._send(job_id)
            sent.append(job_id)
        return sent

    async def reap(self, now: float | None = None) -> list[str]:
        """End the jobs still open ``reaper_grace_s`` past their deadline: no worker will (all dead, or the
        queue lost them). Ends written only where the job is still open, so a late worker's end stands."""
        cutoff = (now or time.time()) - self.settings.reaper_grace_s
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in await self.redis.zrangebyscore(OPEN_KEY, "-inf", cutoff, start=0, num=500)]
        ended: list[str] = []
        for job_id in ids:
            job = parse_job(await self.redis.get(job_key(job_id)))
            if job is None or job.status in TERMINAL:  # expired, or ended by a path that did not leave the set
                await self.redis.zrem(OPEN_KEY, job_id)
                continue
            job = reaped(job)
            if await self._write(job, ("failed", {"id": job_id, "error": job.error.model_dump()})):  # type: ignore[union-attr]
                ended.append(job_id)
                if job.inflight_key:
                    await self.redis.zrem(job.inflight_key, job_id)
        return ended

    async def get(self, job_id: str) -> Job:
        job = parse_job(await self.redis.get(job_key(job_id))) if _valid_id(job_id) else None
        if job is None:
            raise NotFound(f"no job {job_id!r} (unknown or expired)")
        return job

    async def follow(self, job_id: str, after: str = "0") -> AsyncIterator[tuple[str, str, dict[str, Any]] | None]:
        """The job's events from ``after`` on, blocking for new ones; ends after ``done`` or ``failed``."""
        last = after
        while True:
            answer = await self.redis.xread({events_key(job_id): last}, block=_BLOCK_MS, count=100)
            if not answer:
                job = parse_job(await self.redis.get(job_key(job_id)))
                if job is None:
                    return
                yield KEEPALIVE
                continue
            for entry in parse_events(answer[0][1]):  # type: ignore[index, arg-type]
                last = entry[0]
                yield entry
                if entry[1] in TERMINAL:
                    return

    async def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it ended, or None if it had not within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                async for entry in self.follow(job_id):
                    if entry is not None and entry[1] in TERMINAL:
                        break
        except TimeoutError:
            return None
        return await self.get(job_id)


async def enqueue(jobs: JobService, guard: Guard, caller: Caller, query: str, params: dict[str, Any]) -> Job:
    """Submit a job for ``caller``: within its cap of jobs in flight, counted until the worker ends the job."""
    deadline = time.time() + jobs.settings.job_deadline_s
    key = await guard.admit_job(caller, deadline)
    job = await jobs.submit(query, params, request_id=logs.current().get("request_id"), inflight_key=key)
    await guard.record_job(key, job.id, job.deadline_at or deadline)
    return job


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)

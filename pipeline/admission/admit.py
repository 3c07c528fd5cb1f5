"""Admission: the one path by which a search job gets in, whichever edge it came through (the API, the Cloud
Function, the Modal endpoint). In order: who is calling (``callers``), whether the query and its filter are
valid, then one Redis script (``commands.AdmitCreate``) that takes a token from the caller's bucket (rate
limit), counts the caller's jobs in flight and adds this one (the cap), checks the queue's length (the queue
cap) and creates the job's record with its first event. Checking and adding in one script means two requests
at once can never both take the last place; doing it all in one script makes admission one Redis round trip.

Where the limits live in their own Redis (``limits_redis_url``), the limit is one command there and the
creation another here, and while that Redis is away jobs are admitted without limits (``limits``)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis

from pipeline import filters
from pipeline.admission.addresses import networks
from pipeline.admission.callers import Caller, Callers
from pipeline.admission.limits import Limits
from pipeline.errors import InvalidRequest, Unavailable
from pipeline.jobs.commands import AdmitCreate, AsyncExecutor, Create, Limit, Release, SyncExecutor, Write
from pipeline.jobs.keys import inflight_key
from pipeline.jobs.store import AsyncJobStore, JobStore, new_job
from pipeline.settings import ApiSettings
from pipeline.types import Job


def validate(settings: ApiSettings, query: str, params: dict[str, Any]) -> None:
    """The checks a query passes before it costs anything: its length, and its filter (refused here, not
    later in the worker)."""
    if len(query) > settings.limits.max_query_chars:
        raise InvalidRequest(f"the query is {len(query)} characters long; the limit is {settings.limits.max_query_chars}")
    filters.for_search(params.get("filter"))


class Admission:
    """Callers, limits, caps and validation for every edge; ``admit`` (async) and ``admit_sync`` run the same
    plan of commands through the async or the sync face of the job store."""

    def __init__(self, settings: ApiSettings, jobs: AsyncJobStore | JobStore | None,
                 limits: redis.Redis | aioredis.Redis | None = None) -> None:
        """``jobs`` None: an edge with no job store of ours (Modal) uses the keys, the checks and, given
        ``limits`` (an async client), the rate limit. ``limits``: the limits' own Redis client, if apart."""
        self.s, self.jobs = settings, jobs
        self.callers = Callers(settings)
        self.trusted = networks(settings.trusted_proxies)
        self.shared = jobs is not None and (limits is None or limits is jobs.r)  # one Redis: one script does all
        lx: SyncExecutor | AsyncExecutor | None = jobs.x if jobs is not None else None
        if isinstance(limits, redis.Redis):
            lx = SyncExecutor(limits)
        elif limits is not None:
            lx = AsyncExecutor(limits)
        self.limits = Limits(settings, lx)

    # --- the edges' surface: who is calling, and their limits ---
    @property
    def open(self) -> bool:
        return self.callers.open

    def caller(self, token: str | None, address: str, public: bool = False) -> Caller:
        return self.callers.caller(token, address, public)

    def check_owner(self, caller: Caller, job: Job) -> Job:
        return self.callers.check_owner(caller, job)

    def sees_fleet(self, caller: Caller | None) -> bool:
        return self.callers.sees_fleet(caller)

    def check_admin(self, caller: Caller) -> None:
        self.callers.check_admin(caller)

    async def limit(self, caller: Caller, cost: float = 1.0) -> None:
        await self.limits.limit(caller, cost)

    async def open_stream(self, caller: Caller) -> str:
        return await self.limits.open_stream(caller)

    async def close_stream(self, caller: Caller, token: str) -> None:
        await self.limits.close_stream(caller, token)

    async def state(self) -> str:
        return await self.limits.state()

    # --- the plan both faces run ---
    def _plan(self, caller: Caller, query: str, params: dict[str, Any], request_id: str | None,
              job_id: str | None = None) -> tuple[Job, Limit, Create]:
        """The job, and the commands of its admission: its limit, and its creation (queue cap and record)."""
        assert self.jobs is not None, "an edge with no job store admits no job"
        validate(self.s, query, params)
        cap = self.s.limits.max_jobs_in_flight
        job = new_job(self.s, query, params, request_id=request_id, job_id=job_id,
                      inflight_key=inflight_key(caller.id) if cap > 0 else None,
                      owner=caller.id if caller.key_name else None)
        return job, self.limits.command(caller, cap, job.id, job.deadline_at or 0.0), self._create(job)

    def _create(self, job: Job) -> Create:
        assert self.jobs is not None
        write = Write(job, self.jobs.ttl, self.jobs.maxlen, (("queued", {"id": job.id}),), create=True)
        return Create(write, self.s.search_queue, self.s.limits.max_queue_length)

    def _uncounted(self, job: Job, exc: Exception) -> Create:
        """The limits' own Redis is away: the job goes in uncounted (its record then names no in-flight set)."""
        self.limits.away(exc)
        job.inflight_key = None
        return self._create(job)

    def _release(self, job: Job) -> Release | None:
        return Release(job.inflight_key, job.id) if job.inflight_key else None

    # --- async face (the API) ---
    async def admit(self, caller: Caller, query: str, params: dict[str, Any], *,
                    request_id: str | None = None, job_id: str | None = None) -> Job:
        """Admit and queue one search job for ``caller``, or raise why not (InvalidRequest, RateLimited,
        Unavailable). The job counts against the caller's cap until a worker (or the reaper) ends it.
        ``job_id``: one the edge chose (an image query's picture is stored under it first)."""
        job, limit, create = self._plan(caller, query, params, request_id, job_id)
        jobs, lx = self.jobs, self.limits.x
        assert isinstance(jobs, AsyncJobStore) and isinstance(lx, AsyncExecutor)
        if self.shared:  # a refusal counted nothing
            self.limits.verdict(await jobs.x.run(AdmitCreate(limit, create)))
        else:
            try:
                self.limits.verdict(await lx.run(limit))
                self.limits.answered()
            except Unavailable as exc:
                create = self._uncounted(job, exc)
        try:
            if not self.shared:
                self.limits.verdict(await jobs.x.run(create))
            await jobs.send_created(job)
        except BaseException:
            if (release := self._release(job)) is not None:
                await lx.attempt(release, False)  # the entry expires at the job's deadline anyway
            raise
        return job

    # --- sync face (the Cloud Function) ---
    def admit_sync(self, caller: Caller, query: str, params: dict[str, Any], *,
                   request_id: str | None = None) -> Job:
        """``admit`` through the sync face: the same plan, commands and policy."""
        job, limit, create = self._plan(caller, query, params, request_id)
        jobs, lx = self.jobs, self.limits.x
        assert isinstance(jobs, JobStore) and isinstance(lx, SyncExecutor)
        if self.shared:  # a refusal counted nothing
            self.limits.verdict(jobs.x.run(AdmitCreate(limit, create)))
        else:
            try:
                self.limits.verdict(lx.run(limit))
                self.limits.answered()
            except Unavailable as exc:
                create = self._uncounted(job, exc)
        try:
            if not self.shared:
                self.limits.verdict(jobs.x.run(create))
            jobs.send_created(job)
        except BaseException:
            if (release := self._release(job)) is not None:
                lx.attempt(release, False)  # the entry expires at the job's deadline anyway
            raise
        return job

"""The one job store: a job's record and its event stream in Redis, written by the API (async client), the
Cloud Function and the workers (sync client) through the same Lua scripts.

A job is a JSON record under ``imgsearch:job:{id}`` and a Redis Stream of events under
``imgsearch:job:{id}:events``; both expire with the job. The store creates a job and sends it (through a
callable its owner gives it, so the domain never imports the queue), appends events, ends, cancels, releases,
follows and waits. ``JobStore`` is the synchronous face, ``AsyncJobStore`` the asynchronous one: each method is a
command of ``pipeline.jobs.commands`` run by that face's executor, so the two share the scripts, the arguments and
the policy (best effort where what is lost expires anyway, else ``Unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from pipeline import redisconn
from pipeline.errors import Conflict, InvalidRequest, NotFound, Unavailable
from pipeline.jobs.commands import (
    AsyncExecutor,
    Discard,
    DropPicture,
    Event,
    IsCancelled,
    KeepPicture,
    Load,
    MarkCancelled,
    ParsedEvent,
    Picture,
    ReadEvents,
    Release,
    SyncExecutor,
    Write,
    not_replicated,
)
from pipeline.jobs.keys import TERMINAL
from pipeline.settings import SharedSettings
from pipeline.types import ErrorInfo, Job

log = logging.getLogger(__name__)

Send = Callable[[str], None]  # sends a job's task by its id (the queue client of whoever owns the store)
AsyncSend = Callable[[str], Awaitable[None]]

_BLOCK_MS = 1000  # how long one XREAD of a follower blocks before it looks at the record again
_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")  # a Redis stream entry id
KEEPALIVE = None  # yielded by ``AsyncJobStore.follow`` when nothing happened for a while


def connect(url: str, timeout_s: float, **kw: Any) -> redis.Redis:
    """A client for the job code (records, events, limits, heartbeats): it answers ``str``
    (``decode_responses``), as every reader here expects; ``max_connections``, ``sentinel_password`` and the
    like pass through. Any URL pipeline.redisconn reads, a Sentinel group's too."""
    return redisconn.connect(url, timeout_s, **kw)


def aconnect(url: str, timeout_s: float, *, max_connections: int | None = None, name: str | None = None,
             **kw: Any) -> aioredis.Redis:
    """``connect``'s asynchronous twin (the API's). With ``max_connections`` its pool holds at most that many
    connections; past them a call waits up to ``timeout_s`` for one, then fails as Redis being away does (503),
    so the API never takes more of Redis's clients, which the workers share, than its pools allow. ``name``
    labels its connections (CLIENT LIST tells them apart)."""
    return redisconn.aconnect(url, timeout_s, max_connections=max_connections, health_check_interval=10,
                              client_name=name, **kw)


def require_text(client: Any) -> None:
    """Refuse a client that answers bytes: every reader of job records, events and beats takes ``str``."""
    if not client.get_connection_kwargs().get("decode_responses"):
        raise TypeError("the job store needs a Redis client made with decode_responses=True "
                        "(pipeline.jobs.store.connect makes one)")


def new_job(settings: SharedSettings, query: str, params: dict[str, Any], *, request_id: str | None = None,
            inflight_key: str | None = None, job_id: str | None = None, owner: str | None = None) -> Job:
    """A queued job's record: its own ``deadline_s`` (capped by the server's) taken out of its params."""
    params = dict(params)
    wanted = params.pop("deadline_s", None)
    now = time.time()
    return Job(id=job_id or uuid.uuid4().hex, status="queued", query=query,
               params={k: v for k, v in params.items() if v is not None}, created_at=now,
               deadline_at=now + (min(wanted, settings.job_deadline_s) if wanted else settings.job_deadline_s),
               request_id=request_id, inflight_key=inflight_key, owner=owner)


def valid_job_id(job_id: str) -> bool:
    """Whether ``job_id`` looks like one this store made (32 lower-case hex digits), before it names a key."""
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def unknown_job(job_id: str) -> NotFound:
    """The answer for a job that is not there, or not the caller's: the same either way, so ids don't leak."""
    return NotFound(f"no job {job_id!r} (unknown or expired)")


def event_id(last_event_id: str | None) -> str:
    """Where a follower starts: after ``Last-Event-ID``, a stream entry id (``<ms>-<seq>``, or ``<ms>``), or from
    the start without one; InvalidRequest for anything else, before it reaches Redis."""
    if last_event_id is None:
        return "0"
    m = _EVENT_ID.fullmatch(last_event_id)
    if m is None or any(int(p or 0) >= 1 << 64 for p in m.groups()):
        raise InvalidRequest("Last-Event-ID: an event id as the stream sent it (<milliseconds>-<sequence>)")
    return f"{int(m[1])}-{int(m[2] or 0)}"


def reaped(job: Job) -> Job:
    """The job as the reaper ends it: no worker finished it by its deadline (all of them dead, or the queue
    lost it)."""
    job.status, job.finished_at = "failed", time.time()
    job.error = ErrorInfo(code="deadline_exceeded", message="no worker finished the job by its deadline")
    return job


def cancelled_before_run(job: Job) -> Job:
    job.status, job.finished_at = "failed", time.time()
    job.error = ErrorInfo(code="cancelled", message="cancelled by the client before it ran")
    return job


def failed_event(job: Job) -> tuple[str, dict[str, Any]]:
    return "failed", {"id": job.id, "error": job.error.model_dump() if job.error else None}


def public(job: Job) -> dict[str, Any]:
    """The job as clients see it: ``{"id", "status", "query", "results"?, "error"?, "timings"?}`` and a few extras."""
    return job.model_dump(mode="json", exclude_none=True, exclude={"inflight_key", "worker", "owner"})




class JobStore:
    """The synchronous store: what a worker (running jobs) and the Cloud Function (submitting and waiting) use."""

    def __init__(self, client: redis.Redis, ttl: int, maxlen: int, limits: redis.Redis | None = None,
                 retry_s: float = 15.0, worker: str | None = None, send: Send | None = None,
                 replicas: int = 0, wait_ms: int = 50, queue: str = "") -> None:
        require_text(client)
        self.r, self.ttl, self.maxlen, self.retry_s = client, ttl, maxlen, retry_s
        self.worker = worker  # this process's heartbeat name, written into the jobs it runs
        self.send, self.queue = send, queue  # how, and to which queue, it sends a job
        # acknowledged means replicated: a creation and an end wait for ``replicas`` (see commands.Replicated)
        self.x = SyncExecutor(client, replicas, wait_ms)
        self.limits = SyncExecutor(limits) if limits is not None else self.x  # where callers' jobs are counted

    @classmethod
    def from_settings(cls, settings: SharedSettings, client: redis.Redis, **kw: Any) -> JobStore:
        return cls(client, settings.job_ttl_s, settings.events_maxlen, replicas=settings.replica_acks,
                   wait_ms=settings.replica_wait_ms, queue=settings.search_queue, **kw)

    def cancelled(self, job_id: str) -> bool:
        """Whether the client cancelled the job (can't tell: carry on; the deadline still bounds the job)."""
        return self.x.attempt(IsCancelled(job_id), False)

    def release(self, job: Job) -> None:
        """The job no longer counts against its caller's cap (best effort: the entry also expires)."""
        if job.inflight_key:
            self.limits.attempt(Release(job.inflight_key, job.id), False)

    def load(self, job_id: str) -> Job | None:
        return self.x.run(Load(job_id))

    def write(self, job: Job, *events: tuple[str, dict[str, Any]], create: bool = False) -> bool:
        """Write the record and its events at once; False (nothing written) if the job already ended. Redis
        restarting: the end of a job that ran is worth a few seconds' wait (``retry_s``). An end counts once a
        replica confirmed it (see ``_replicate``)."""
        cmd = Write(job, self.ttl, self.maxlen, events, create)
        written = self.x.run(cmd, within_s=self.retry_s)
        return self._replicate(cmd, written) if job.status in TERMINAL and not create else written

    def _replicate(self, end: Write, written: bool) -> bool:
        """Wait, up to ``retry_s``, for a replica to confirm the end just written. Unconfirmed, it is written
        again (conditionally: the first end still wins) before each new wait, since a failover may have taken
        it with the old primary; the answer then says whether the end that stands is this one."""
        until, pause = time.monotonic() + self.retry_s, 0.1
        while not self.x.replicated():
            if time.monotonic() > until:
                log.warning("job %s: its end not confirmed by a replica in %.0f s", end.job.id, self.retry_s)
                return written
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
            try:
                again = self.x.run(end)
            except Unavailable:
                continue
            cur = None if again else self.x.attempt(Load(end.job.id), None)
            written = again or (written and cur is not None and cur.finished_at == end.job.finished_at)
        return written

    def event(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        """A progress event (best effort: the end's record and events carry everything a client needs)."""
        self.x.attempt(Event(job_id, event, data, self.maxlen, self.ttl), False)

    def submit(self, job: Job) -> Job:
        """Create the queued job (record and first event at once) and send it (see ``send_created``)."""
        self.x.run(Write(job, self.ttl, self.maxlen, (("queued", {"id": job.id}),), create=True))
        return self.send_created(job)

    def send_created(self, job: Job) -> Job:
        """Send a created job; if the queue is unreachable its record goes again (Unavailable), so no job is
        left that nothing will run. Sent, it is acknowledged once a replica confirmed its record and message;
        if none does in time, both go again (Unavailable ``not_replicated``)."""
        if self.send is None:
            raise RuntimeError("this job store was made without a send callable; it cannot send")
        try:
            self.send(job.id)
        except Exception as exc:  # the broker is unreachable
            self.x.attempt(Discard(job.id), 0)  # Redis away too: the reaper ends the record at its deadline
            raise Unavailable(f"could not enqueue the job: {type(exc).__name__}") from exc
        if not self.x.replicated():
            self.x.attempt(Discard(job.id, self.queue), 0)
            raise not_replicated(self.x.replicas, self.x.wait_ms)
        return job

    def image(self, job_id: str) -> bytes | None:
        """An image query's picture, as the API kept it (pipeline.search.image_query), or None once it expired."""
        return self.x.run(Picture(job_id))

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it ended (following its event stream), or None after ``timeout`` seconds."""
        until, last = time.monotonic() + timeout, "0"
        while (left := until - time.monotonic()) > 0:
            block = max(1, int(min(left, 1.0) * 1000))
            for entry_id, name, _ in self.x.run(ReadEvents(job_id, last, 100, block)):
                last = entry_id
                if name in TERMINAL:
                    return self.load(job_id)
        return None


class AsyncJobStore:
    """The asynchronous store: what the API uses to submit, read, cancel, follow and wait on jobs. Its policy is
    ``JobStore``'s, through the async executor."""

    def __init__(self, settings: SharedSettings, client: aioredis.Redis, send: AsyncSend,
                 limits: aioredis.Redis | None = None, streams: aioredis.Redis | None = None) -> None:
        require_text(client)
        if streams is not None:
            require_text(streams)
        self.settings, self.r, self.send = settings, client, send
        self.ttl, self.maxlen = settings.job_ttl_s, settings.events_maxlen
        # acknowledged means replicated: a creation waits for replica_acks replicas (see commands.Replicated)
        self.x = AsyncExecutor(client, settings.replica_acks, settings.replica_wait_ms)
        self.limits = AsyncExecutor(limits) if limits is not None else self.x
        # what followers block on: a pool of their own, so they can't starve the rest
        self.streams = AsyncExecutor(streams) if streams is not None else self.x

    async def write(self, job: Job, *events: tuple[str, dict[str, Any]], create: bool = False) -> bool:
        """The record and events at once, unless the job already ended (see commands.Write)."""
        return await self.x.run(Write(job, self.ttl, self.maxlen, events, create))

    async def submit(self, job: Job) -> Job:
        """Create the queued job and send it (see ``send_created``)."""
        await self.write(job, ("queued", {"id": job.id}), create=True)
        return await self.send_created(job)

    async def send_created(self, job: Job) -> Job:
        """Send a created job; if the queue is unreachable its record goes again (Unavailable), so no job is
        left that nothing will run; acknowledged once a replica confirmed it (see ``JobStore.send_created``)."""
        try:
            await self.send(job.id)
        except Exception as exc:  # the broker is unreachable
            await self.x.attempt(Discard(job.id), 0)  # Redis away too: the reaper ends the record at its deadline
            raise Unavailable(f"could not enqueue the job: {type(exc).__name__}") from exc
        if not await self.x.replicated():  # see JobStore.send_created
            await self.x.attempt(Discard(job.id, self.settings.search_queue), 0)
            raise not_replicated(self.x.replicas, self.x.wait_ms)
        return job

    async def keep_image(self, job_id: str, data: bytes) -> None:
        """An image query's checked picture, kept under the job as long as its record; stored before the job is
        admitted, since a worker may take the job the moment it is sent."""
        await self.x.run(KeepPicture(job_id, data, self.ttl))

    async def drop_image(self, job_id: str) -> None:
        """The picture of a job that was not admitted (best effort: it expires with the record's TTL anyway)."""
        await self.x.attempt(DropPicture(job_id), 0)

    async def release(self, job: Job) -> None:
        """The job no longer counts against its caller's cap (best effort: the entry also expires)."""
        if job.inflight_key:
            await self.limits.attempt(Release(job.inflight_key, job.id), False)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job: a queued one ends ``failed`` (code ``cancelled``) at once and no
        worker runs it; a running one ends so at its next stage boundary. An ended job is a conflict."""
        job = await self.get(job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already ended ({job.status})")
        await self.x.run(MarkCancelled(job_id, self.ttl))
        if job.status == "queued":
            job = cancelled_before_run(job)
            if not await self.write(job, failed_event(job)):
                raise Conflict(f"job {job_id} ended before it could be cancelled")
            await self.release(job)
        return job

    async def load(self, job_id: str) -> Job | None:
        return await self.x.run(Load(job_id))

    async def get(self, job_id: str) -> Job:
        """The job, or NotFound (an id this store could not have made names no key)."""
        job = await self.load(job_id) if valid_job_id(job_id) else None
        if job is None:
            raise unknown_job(job_id)
        return job

    async def follow(self, job_id: str, after: str = "0") -> AsyncIterator[ParsedEvent | None]:
        """The job's events from ``after`` on, blocking for new ones; ends after ``done`` or ``failed``, and once the
        job ended whatever ``after`` was (one past its last event, or in the future, included). Yields KEEPALIVE
        (None) when nothing happened for a while."""
        last = after
        while True:
            entries = await self.streams.run(ReadEvents(job_id, last, 100, _BLOCK_MS))
            if not entries:
                job = await self.load(job_id)
                if job is None:
                    return
                if job.status in TERMINAL:  # what it wrote after ``last`` may have landed since the wait: sent, then the end
                    for entry in await self.streams.run(ReadEvents(job_id, last, self.maxlen)):
                        yield entry
                    return
                yield KEEPALIVE
                continue
            for entry in entries:
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

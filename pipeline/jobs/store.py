"""The one job store: a job's record and its event stream in Redis, written by the API (async client), the
Cloud Function and the workers (sync client) through the same Lua scripts.

A job is a JSON record under ``imgsearch:job:{id}`` and a Redis Stream of events under
``imgsearch:job:{id}:events``; both expire with the job. The store creates a job and sends it (through a
callable its owner gives it, so the domain never imports the queue), appends events, ends, cancels, releases,
follows and waits. ``JobStore`` is the synchronous face, ``AsyncJobStore`` the asynchronous one; they share
the scripts and the argument building below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from tenacity import RetryCallState

from pipeline import redisconn
from pipeline.errors import Conflict, InvalidRequest, NotFound, Unavailable
from pipeline.jobs.keys import OPEN_KEY, TERMINAL, cancel_key, events_key, image_key, job_key
from pipeline.retry import last_error, retrying
from pipeline.settings import SharedSettings
from pipeline.types import ErrorInfo, Job

log = logging.getLogger(__name__)

Send = Callable[[str], None]  # sends a job's task by its id (the queue client of whoever owns the store)
AsyncSend = Callable[[str], Awaitable[None]]

# Writes a job's record and appends its events, unless the job already ended: the first end wins, so a job run
# twice (redelivered while its first worker still ran, cancelled or reaped meanwhile) ends once, with one set of
# results. A job that ends leaves the open set, and its query picture (if it had one) is dropped in the same
# script: nothing of an ended job but its record and events stays in Redis. A new one joins the open set, scored
# by its deadline.
# Keys: record, events, open set, picture (admission's creation passes none). A: record JSON, ttl, maxlen,
# create ("1": the record must not exist yet, "0": it must), job id, deadline ("" for none), then event name and
# data pairs. Returns 1 if written, else 0.
# A function, so admission's script (pipeline.admission) creates a job with the very same code.
WRITE_FUNCTION = """
local function write_job(krec, kev, kopen, A, kimg)
  local cur = redis.call('GET', krec)
  if A[4] == '1' then
    if cur then return 0 end
  else
    if not cur then return 0 end
    local st = cjson.decode(cur)['status']
    if st == 'done' or st == 'failed' then return 0 end
  end
  redis.call('SET', krec, A[1], 'EX', A[2])
  for i = 7, #A, 2 do
    redis.call('XADD', kev, 'MAXLEN', '~', A[3], '*', 'event', A[i], 'data', A[i + 1])
  end
  if #A >= 7 then redis.call('EXPIRE', kev, A[2]) end
  local st = cjson.decode(A[1])['status']
  if st == 'done' or st == 'failed' then
    redis.call('ZREM', kopen, A[5])
    if kimg then redis.call('DEL', kimg) end
  elseif A[6] ~= '' then
    redis.call('ZADD', kopen, A[6], A[5])
  end
  return 1
end
"""
WRITE_SCRIPT = WRITE_FUNCTION + "return write_job(KEYS[1], KEYS[2], KEYS[3], ARGV, KEYS[4])\n"


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

_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")  # a Redis stream entry id
_BLOCK_MS = 1000  # how long one XREAD of a follower blocks before it looks at the record again
KEEPALIVE = None  # yielded by ``AsyncJobStore.follow`` when nothing happened for a while


def write_args(job: Job, events: list[tuple[str, dict[str, Any]]], ttl: int, maxlen: int,
               create: bool = False) -> tuple[list[str], list[Any]]:
    """Keys and arguments of one WRITE_SCRIPT call (run by an async or a sync client)."""
    args: list[Any] = [job.model_dump_json(exclude_none=True), ttl, maxlen, "1" if create else "0", job.id,
                       "" if job.deadline_at is None or job.status in TERMINAL else repr(job.deadline_at)]
    for name, data in events:
        args += [name, _dumps(data)]
    return [job_key(job.id), events_key(job.id), OPEN_KEY, image_key(job.id)], args


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


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


def parse_job(raw: bytes | str | None) -> Job | None:
    return None if raw is None else Job.model_validate_json(raw)


def parse_events(entries: list[tuple[Any, dict[Any, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(stream id, event name, data)`` for each entry of an XRANGE/XREAD answer."""
    out = []
    for entry_id, fields in entries:
        out.append((entry_id, fields["event"], json.loads(fields["data"])))
    return out


def public(job: Job) -> dict[str, Any]:
    """The job as clients see it: ``{"id", "status", "query", "results"?, "error"?, "timings"?}`` and a few extras."""
    return job.model_dump(mode="json", exclude_none=True, exclude={"inflight_key", "worker", "owner"})


class JobStore:
    """The synchronous store: what a worker (running jobs) and the Cloud Function (submitting and waiting) use."""

    def __init__(self, client: redis.Redis, ttl: int, maxlen: int, limits: redis.Redis | None = None,
                 retry_s: float = 15.0, worker: str | None = None, send: Send | None = None) -> None:
        require_text(client)
        self.r, self.ttl, self.maxlen, self.retry_s = client, ttl, maxlen, retry_s
        self.worker = worker  # this process's heartbeat name, written into the jobs it runs
        self.limits = limits or client  # where admission counts each caller's jobs in flight
        self.send = send
        self._write = client.register_script(WRITE_SCRIPT)
        self._event = client.register_script(EVENT_SCRIPT)

    @classmethod
    def from_settings(cls, settings: SharedSettings, client: redis.Redis, **kw: Any) -> JobStore:
        return cls(client, settings.job_ttl_s, settings.events_maxlen, **kw)

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

        def warn(state: RetryCallState) -> None:
            log.warning("job %s: Redis unreachable (%s); writing again in %.1f s", job.id, last_error(state),
                        state.upcoming_sleep)

        # Redis restarting: the end of a job that ran is worth a few seconds' wait (bounded in time, not tries)
        again = retrying((redis.ConnectionError, redis.TimeoutError), within_s=self.retry_s, first_s=0.1, max_s=2.0,
                         before_sleep=warn)
        return bool(again(self._write, keys=keys, args=args))

    def event(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        """A progress event (best effort: the end's record and events carry everything a client needs)."""
        try:
            self._event(keys=[job_key(job_id), events_key(job_id)], args=[event, _dumps(data), self.maxlen, self.ttl])
        except redis.RedisError as exc:
            log.warning("job %s: %s event not written: %s", job_id, event, exc)

    def submit(self, job: Job) -> Job:
        """Create the queued job (record and first event at once) and send it (see ``send_created``)."""
        keys, args = write_args(job, [("queued", {"id": job.id})], self.ttl, self.maxlen, create=True)
        self._write(keys=keys, args=args)
        return self.send_created(job)

    def send_created(self, job: Job) -> Job:
        """Send a created job; its record is removed again if the queue refused it, so no job is left that
        nothing will run."""
        if self.send is None:
            raise RuntimeError("this job store was made without a send callable; it cannot send")
        try:
            self.send(job.id)
        except Exception:
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(job_key(job.id), events_key(job.id))
            pipe.zrem(OPEN_KEY, job.id)
            pipe.execute()
            raise
        return job

    def image(self, job_id: str) -> bytes | None:
        """An image query's picture, as the API kept it (pipeline.image_query), or None once it expired."""
        # raw bytes from a client that decodes answers: redis-py's own per-command switch (its DUMP uses it)
        data = self.r.execute_command("GET", image_key(job_id), **{NEVER_DECODE: True})
        return None if data is None else bytes(data)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once it ended (following its event stream), or None after ``timeout`` seconds."""
        until, last = time.monotonic() + timeout, "0"
        while (left := until - time.monotonic()) > 0:
            got = self.r.xread({events_key(job_id): last}, block=max(1, int(min(left, 1.0) * 1000)), count=100)
            for entry_id, name, _ in parse_events(got[0][1] if got else []):  # type: ignore[index]
                last = entry_id
                if name in TERMINAL:
                    return self.load(job_id)
        return None


class AsyncJobStore:
    """The asynchronous store: what the API uses to submit, read, cancel, follow and wait on jobs."""

    def __init__(self, settings: SharedSettings, client: aioredis.Redis, send: AsyncSend,
                 limits: aioredis.Redis | None = None, streams: aioredis.Redis | None = None) -> None:
        require_text(client)
        self.settings, self.r, self.send = settings, client, send
        self.limits = limits or client
        if streams is not None:
            require_text(streams)
        self.streams = streams or client  # what followers block on: a pool of their own, so they can't starve the rest
        self.ttl, self.maxlen = settings.job_ttl_s, settings.events_maxlen
        self._write_script = client.register_script(WRITE_SCRIPT)

    async def write(self, job: Job, *events: tuple[str, dict[str, Any]], create: bool = False) -> bool:
        """The record and events at once, unless the job already ended (see WRITE_SCRIPT)."""
        keys, args = write_args(job, list(events), self.ttl, self.maxlen, create)
        return bool(await self._write_script(keys=keys, args=args))

    async def submit(self, job: Job) -> Job:
        """Create the queued job and send it (see ``send_created``)."""
        await self.write(job, ("queued", {"id": job.id}), create=True)
        return await self.send_created(job)

    async def send_created(self, job: Job) -> Job:
        """Send a created job; if the queue is unreachable its record goes again (Unavailable), so no job is
        left that nothing will run."""
        try:
            await self.send(job.id)
        except Exception as exc:  # the broker is unreachable
            try:
                pipe = self.r.pipeline(transaction=True)
                pipe.delete(job_key(job.id), events_key(job.id))
                pipe.zrem(OPEN_KEY, job.id)
                await pipe.execute()
            except Exception:  # noqa: BLE001 - Redis away too: the reaper ends the record at its deadline
                pass
            raise Unavailable(f"could not enqueue the job: {type(exc).__name__}") from exc
        return job

    async def keep_image(self, job_id: str, data: bytes) -> None:
        """An image query's checked picture, kept under the job as long as its record; stored before the job is
        admitted, since a worker may take the job the moment it is sent."""
        await self.r.set(image_key(job_id), data, ex=self.ttl)

    async def drop_image(self, job_id: str) -> None:
        """The picture of a job that was not admitted (best effort: it expires with the record's TTL anyway)."""
        try:
            await self.r.delete(image_key(job_id))
        except Exception:  # noqa: BLE001 - Redis away: the refusal being answered matters more
            pass

    async def release(self, job: Job) -> None:
        if job.inflight_key:
            await self.limits.zrem(job.inflight_key, job.id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job: a queued one ends ``failed`` (code ``cancelled``) at once and no
        worker runs it; a running one ends so at its next stage boundary. An ended job is a conflict."""
        job = await self.get(job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already ended ({job.status})")
        await self.r.set(cancel_key(job_id), b"1", ex=self.ttl)
        if job.status == "queued":
            job = cancelled_before_run(job)
            if not await self.write(job, failed_event(job)):
                raise Conflict(f"job {job_id} ended before it could be cancelled")
            await self.release(job)
        return job

    async def load(self, job_id: str) -> Job | None:
        return parse_job(await self.r.get(job_key(job_id)))

    async def get(self, job_id: str) -> Job:
        """The job, or NotFound (an id this store could not have made names no key)."""
        job = await self.load(job_id) if valid_job_id(job_id) else None
        if job is None:
            raise unknown_job(job_id)
        return job

    async def follow(self, job_id: str, after: str = "0") -> AsyncIterator[tuple[str, str, dict[str, Any]] | None]:
        """The job's events from ``after`` on, blocking for new ones; ends after ``done`` or ``failed``, and once the
        job ended whatever ``after`` was (one past its last event, or in the future, included). Yields KEEPALIVE
        (None) when nothing happened for a while."""
        last, key = after, events_key(job_id)
        while True:
            answer = await self.streams.xread({key: last}, block=_BLOCK_MS, count=100)
            if not answer:
                job = await self.load(job_id)
                if job is None:
                    return
                if job.status in TERMINAL:  # what it wrote after ``last`` may have landed since the wait: sent, then the end
                    rest: Any = await self.streams.xread({key: last}, count=self.maxlen)
                    for entry in parse_events(rest[0][1] if rest else []):
                        yield entry
                    return
                yield KEEPALIVE
                continue
            for entry in parse_events(answer[0][1]):  # type: ignore[index]
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

"""A caller's limits: its token bucket (the rate limit of every route), its jobs in flight (the in-flight cap)
and its open event streams (the stream cap), each a ``commands.Limit`` run where the limits live.

The limits may live in their own Redis (``limits_redis_url``). While that Redis is away, requests are served
without limits rather than refused (``down_since`` says since when, and ``state()`` says so): a counter's outage
must not become the product's."""

from __future__ import annotations

import logging
import time
import uuid

from pipeline.admission.callers import Caller
from pipeline.errors import RateLimited, Unavailable
from pipeline.jobs.commands import AsyncExecutor, Limit, Ping, Release, SyncExecutor, Verdict
from pipeline.jobs.keys import bucket_key, inflight_key, streams_key
from pipeline.settings import ApiSettings

log = logging.getLogger(__name__)


class Limits:
    """The limit commands for one settings, run through ``x`` (an async or a sync executor: the async methods
    below need the async one), and whether the limits' Redis answers."""

    def __init__(self, settings: ApiSettings, x: AsyncExecutor | SyncExecutor | None) -> None:
        self.s, self.x = settings, x
        self.down_since: float | None = None

    def command(self, caller: Caller, cap: int = 0, member: str = "", until: float = 0.0,
                cost: float = 1.0, counted: str | None = None) -> Limit:
        """``cost`` tokens from the caller's bucket and, under ``cap``, ``member`` counted in its jobs in flight
        (or in ``counted``) until ``until``."""
        rate = self.s.limits.rate_limit_per_min / 60.0 if self.s.limits.rate_limit_per_min > 0 else 0.0
        return Limit(bucket_key(caller.id), counted or inflight_key(caller.id), self.s.limits.rate_limit_burst, rate,
                     cost, cap, member, until)

    def answered(self) -> None:
        self.down_since = None

    def away(self, exc: BaseException) -> None:
        """The limits' Redis did not answer: serve on without limits (said once, until it answers again)."""
        if self.down_since is None:
            log.warning("rate-limit store unavailable (%s): serving without limits",
                        type(exc.__cause__ or exc).__name__)
            self.down_since = time.time()

    def verdict(self, v: Verdict, streams: bool = False) -> None:
        """Raise the refusal a script answered, if any (``streams``: its cap counted event streams, not jobs)."""
        s = self.s
        if v.ok:
            return
        if v.what == "rate_limited":
            raise RateLimited(f"rate limit: {s.limits.rate_limit_per_min} requests a minute (bursts of "
                              f"{s.limits.rate_limit_burst}); retry later", v.figure)
        if v.what == "too_many_jobs" and streams:
            raise RateLimited(f"{v.figure:.0f} of your event streams are open (the cap is "
                              f"{s.limits.max_streams_per_caller}); close one first", 1.0, code="too_many_streams")
        if v.what == "too_many_jobs":
            raise RateLimited(f"{v.figure:.0f} of your jobs are still queued or running (the cap is "
                              f"{s.limits.max_jobs_in_flight}); wait for them", 1.0, code="too_many_jobs")
        if v.what == "queue_full":
            raise Unavailable(f"the search queue is full ({s.limits.max_queue_length} jobs waiting); retry shortly",
                              code="queue_full")
        raise Unavailable(f"the job could not be created ({v.what})")

    async def _counted(self, cmd: Limit, streams: bool = False) -> bool:
        """Run ``cmd`` (async face), raising its refusal; False if the limits' Redis is away (served without)."""
        assert isinstance(self.x, AsyncExecutor)
        try:
            v = await self.x.run(cmd)
        except Unavailable as exc:
            self.away(exc)
            return False
        self.answered()
        self.verdict(v, streams)
        return True

    async def limit(self, caller: Caller, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from the caller's bucket (``limits.rate_limit_per_min``, bursts of ``limits.rate_limit_burst``):
        the routes that make no job."""
        if self.s.limits.rate_limit_per_min > 0 and self.x is not None:
            await self._counted(self.command(caller, cost=cost))

    async def open_stream(self, caller: Caller) -> str:
        """Count an event stream of ``caller``, in one script: a token from its bucket (the rate limit of every
        route) and a place among its open streams (``limits.max_streams_per_caller``), held until ``close_stream`` or
        for ``limits.stream_max_s`` at most (a stream lasts no longer, so a crashed API's entries lapse). RateLimited
        past either; the stream's token to close it with."""
        token = uuid.uuid4().hex
        cap = self.s.limits.max_streams_per_caller
        if self.x is None or (cap <= 0 and self.s.limits.rate_limit_per_min <= 0):
            return token
        await self._counted(self.command(caller, cap, token, time.time() + self.s.limits.stream_max_s + 5,
                                         counted=streams_key(caller.id)), streams=True)
        return token

    async def close_stream(self, caller: Caller, token: str) -> None:
        """Best effort: the entry lapses at the stream's longest life anyway."""
        if isinstance(self.x, AsyncExecutor) and self.s.limits.max_streams_per_caller > 0:
            await self.x.attempt(Release(streams_key(caller.id), token), False)

    async def state(self) -> str:
        assert isinstance(self.x, AsyncExecutor)
        try:
            await self.x.run(Ping())
            return "ok"
        except Unavailable as exc:
            return f"down ({type(exc.__cause__ or exc).__name__})"

"""Admission: the one path by which a search job gets in, whichever edge it came through (the API, the Cloud
Function, the Modal endpoint). In order: who is calling (API keys, kept as SHA-256 hashes), whether the query
and its filter are valid, then one Redis script that takes a token from the caller's bucket (rate limit),
counts the caller's jobs in flight and adds this one (the cap), checks the queue's length (the queue cap) and
creates the job's record with its first event. Checking and adding in one script means two requests at once
can never both take the last place; doing it all in one script makes admission one Redis round trip.

Keys are random 32-byte tokens, so a plain SHA-256 is enough to keep them unrecoverable from the settings
(a slow password hash guards guessable secrets; these are not guessable). With no key configured the API
is open, as for local use, and the admin routes are closed.

The limits may live in their own Redis (``limits_redis_url``): then the bucket and the in-flight count are one
script there and the queue check with the record another here, and while that Redis is down jobs are admitted
without limits (and ``state()`` says so)."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline import filters
from pipeline.errors import Forbidden, InvalidRequest, RateLimited, Unauthorized, Unavailable
from pipeline.jobs.keys import bucket_key, inflight_key, streams_key
from pipeline.jobs.store import WRITE_FUNCTION, AsyncJobStore, JobStore, new_job, unknown_job, write_args
from pipeline.settings import ApiSettings
from pipeline.types import Job

log = logging.getLogger(__name__)

# A: burst, rate per second (0: no rate limit), cost, in-flight cap (0: none), now, job id, deadline.
# admit_check: a token from the bucket (Redis's own clock, so every API instance shares one), then the caller's
# jobs in flight counted (those past their deadline no longer count); returns nil or {refusal, figure}.
# admit_add: this job counted until its deadline (or until the worker that ends it releases it).
_ADMIT_FUNCTIONS = """
local function admit_check(kb, ki, A)
  local rate = tonumber(A[2])
  if rate > 0 then
    local cap, cost = tonumber(A[1]), tonumber(A[3])
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local b = redis.call('HMGET', kb, 'tokens', 'ts')
    local tokens, ts = tonumber(b[1]) or cap, tonumber(b[2]) or now
    tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
    local refused = tokens < cost
    if not refused then tokens = tokens - cost end
    redis.call('HSET', kb, 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('EXPIRE', kb, math.ceil(cap / rate) + 1)
    if refused then return {'rate_limited', tostring((cost - tokens) / rate)} end
  end
  if tonumber(A[4]) > 0 then
    redis.call('ZREMRANGEBYSCORE', ki, '-inf', A[5])
    local n = redis.call('ZCARD', ki)
    if n >= tonumber(A[4]) then return {'too_many_jobs', tostring(n)} end
  end
  return nil
end
local function admit_add(ki, A)
  if tonumber(A[4]) > 0 then
    redis.call('ZADD', ki, A[7], A[6])
    redis.call('EXPIREAT', ki, math.floor(tonumber(A[7])) + 60)
  end
end
local function queue_full(kq, cap)
  if tonumber(cap) > 0 then
    local n = redis.call('LLEN', kq)
    if n >= tonumber(cap) then return {'queue_full', tostring(n)} end
  end
  return nil
end
local function tail(A, from)
  local out = {}
  for i = from, #A do out[#out + 1] = A[i] end
  return out
end
"""
_OK = "return {'ok', '0'}\n"
# KEYS: bucket, in-flight set. ARGV: as A above. Where the limits live apart from the jobs; also the bare rate
# limit of the routes that make no job (in-flight cap 0).
ADMIT_SCRIPT = _ADMIT_FUNCTIONS + """
local r = admit_check(KEYS[1], KEYS[2], ARGV)
if r then return r end
admit_add(KEYS[2], ARGV)
""" + _OK
# KEYS: queue, record, events, open set (then the picture's, unused: a creation ends nothing).
# ARGV: queue cap, then WRITE_FUNCTION's. The job's half, apart.
CREATE_SCRIPT = _ADMIT_FUNCTIONS + WRITE_FUNCTION + """
local r = queue_full(KEYS[1], ARGV[1])
if r then return r end
if write_job(KEYS[2], KEYS[3], KEYS[4], tail(ARGV, 2)) == 0 then return {'exists', '0'} end
""" + _OK
# KEYS: bucket, in-flight set, queue, record, events, open set (and the picture's, unused).
# ARGV: A (7), queue cap, then WRITE_FUNCTION's.
# Everything at once, where the limits and the jobs share one Redis (the default).
ADMIT_CREATE_SCRIPT = _ADMIT_FUNCTIONS + WRITE_FUNCTION + """
local r = admit_check(KEYS[1], KEYS[2], ARGV) or queue_full(KEYS[3], ARGV[8])
if r then return r end
if write_job(KEYS[4], KEYS[5], KEYS[6], tail(ARGV, 9)) == 0 then return {'exists', '0'} end
admit_add(KEYS[2], ARGV)
""" + _OK


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "isk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    id: str  # what limits count against: "key:<name>" or "ip:<address>"
    key_name: str | None = None
    admin: bool = False
    monitor: bool = False


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(specs: Iterable[str]) -> list[Network]:
    """Trusted proxies' networks; a v4-mapped IPv6 one (``::ffff:10.0.0.0/104``) as the IPv4 one it names, since
    addresses are unmapped before they are matched."""
    out: list[Network] = []
    for spec in specs:
        net = ipaddress.ip_network(spec, strict=False)
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        out.append(ipaddress.IPv4Network((mapped, net.prefixlen - 96)) if mapped and net.prefixlen >= 96 else net)
    return out


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IP | None:
    """One address as a peer or an X-Forwarded-For entry gives it, or None for anything that is not one: a port
    is stripped (``1.2.3.4:5678``, ``[2001:db8::1]:443``) and so is an IPv6 zone, and a v4-mapped IPv6 address
    (``::ffff:1.2.3.4``) is the IPv4 address it carries."""
    s = text.strip()
    if s.startswith("["):  # [v6] or [v6]:port
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        s = host
    elif s.count(":") == 1:  # v4:port (a bare v6 address holds two colons or more)
        s, _, port = s.partition(":")
        if not port.isdigit():
            return None
    try:
        ip = ipaddress.ip_address(s.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bucket_of(ip: IP) -> str:
    """What one client's limits count against: an IPv4 address, or an IPv6 address's /64 (a host usually holds a
    whole /64, so one bucket per address would give it 2**64 of them)."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def client_address(peer: str, forwarded_for: str | Iterable[str], trusted: list[Network]) -> str:
    """The client's address, as its limits' bucket (``bucket_of``): the peer's; behind a trusted proxy, the
    right-most address of X-Forwarded-For (every line of it, in order) that is not itself a trusted proxy, as is
    standard: what a client writes to the left of it is not believed. An entry that is no address ends the walk
    at the peer (a proxy of ours never writes one)."""
    ip = parse_address(peer)
    if ip is None:
        return peer[:64] or "unknown"  # no IP peer (a unix socket): nothing better to tell callers apart by

    def is_trusted(addr: IP) -> bool:
        return any(addr in net for net in trusted)

    if not is_trusted(ip):
        return bucket_of(ip)
    lines = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for)
    chain = [a for line in lines for a in line.split(",") if a.strip()]
    last = ip
    for entry in reversed(chain):
        addr = parse_address(entry)
        if addr is None:
            return bucket_of(ip)
        if not is_trusted(addr):
            return bucket_of(addr)
        last = addr  # every hop so far is ours: the left-most of them, if nothing else is left
    return bucket_of(last)


def validate(settings: ApiSettings, query: str, params: dict[str, Any]) -> None:
    """The checks a query passes before it costs anything: its length, and its filter (refused here, not
    later in the worker)."""
    if len(query) > settings.max_query_chars:
        raise InvalidRequest(f"the query is {len(query)} characters long; the limit is {settings.max_query_chars}")
    filters.for_search(params.get("filter"))


class Admission:
    """Keys, limits, caps and validation for every edge; ``admit`` (async) and ``admit_sync`` run the same
    plan through an async or a sync client."""

    def __init__(self, settings: ApiSettings, jobs: AsyncJobStore | JobStore | None, limits: Any = None) -> None:
        """``jobs`` None: an edge with no job store of ours (Modal) uses the keys, the checks and, given
        ``limits``, the rate limit."""
        self.s = settings
        self.jobs: Any = jobs
        self.r = limits if limits is not None or jobs is None else jobs.r
        self.shared = jobs is not None and (limits is None or limits is jobs.r)  # one Redis: one script does all
        self.keys = {k.sha256.lower(): k for k in settings.api_keys}
        self.trusted = networks(settings.trusted_proxies)
        self.down_since: float | None = None
        if self.r is not None:
            self._admit = self.r.register_script(ADMIT_SCRIPT)
        if jobs is not None:
            self._create = jobs.r.register_script(CREATE_SCRIPT)
            self._admit_create = jobs.r.register_script(ADMIT_CREATE_SCRIPT)

    # --- who is calling ---
    @property
    def open(self) -> bool:
        return not self.keys

    def caller(self, token: str | None, address: str, public: bool = False) -> Caller:
        """The caller: by address while no key is configured (or, on a ``public`` route, when it sends none); else
        by key (Unauthorized without a valid one)."""
        if self.open or (public and not token):
            return Caller(f"ip:{address}")
        if not token:
            raise Unauthorized("an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        key = self.keys.get(hash_key(token))
        if key is None:
            raise Unauthorized("the API key is not valid")
        return Caller(f"key:{key.name}", key.name, key.admin, key.monitor)

    def check_owner(self, caller: Caller, job: Job) -> Job:
        """``job`` if ``caller`` may read, follow or cancel it: its own, any with an admin key, any while the API
        is open; else the very answer an unknown id gets (NotFound), so a job's id tells nothing to others."""
        if self.open or caller.admin or job.owner == caller.id:
            return job
        raise unknown_job(job.id)

    def sees_fleet(self, caller: Caller | None) -> bool:
        """Whether ``caller`` may see the fleet (/metrics, /readyz's workers: host names, PIDs, circuits, queue
        depths): anyone while the API is open (local use), else an admin or a monitor key only."""
        return self.open or (caller is not None and (caller.admin or caller.monitor))

    def check_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise Forbidden("this route needs an admin API key" if not self.open else
                            "admin routes are closed while no API keys are configured (IMGSEARCH_API_KEYS)")

    # --- the plan both faces run ---
    def _limit_args(self, caller: Caller, cap: int, job_id: str = "", deadline: float = 0.0,
                    cost: float = 1.0) -> tuple[list[str], list[Any]]:
        rate = self.s.rate_limit_per_min / 60.0 if self.s.rate_limit_per_min > 0 else 0
        return ([bucket_key(caller.id), inflight_key(caller.id)],
                [self.s.rate_limit_burst, rate, cost, cap, repr(time.time()), job_id, repr(deadline)])

    def _plan(self, caller: Caller, query: str, params: dict[str, Any], request_id: str | None,
              job_id: str | None = None) -> tuple[Job, list[str], list[Any], list[Any]]:
        """The job, and the keys and arguments of its admission: limits (A) and creation (the queue cap and
        the record)."""
        validate(self.s, query, params)
        cap = self.s.max_jobs_in_flight
        job = new_job(self.s, query, params, request_id=request_id, job_id=job_id,
                      inflight_key=inflight_key(caller.id) if cap > 0 else None,
                      owner=caller.id if caller.key_name else None)
        lkeys, largs = self._limit_args(caller, cap, job.id, job.deadline_at or 0.0)
        wkeys, wargs = write_args(job, [("queued", {"id": job.id})], self.jobs.ttl, self.jobs.maxlen, create=True)
        return job, lkeys + [self.s.search_queue] + wkeys, largs, [self.s.max_queue_length] + wargs

    def _verdict(self, answer: Any, streams: bool = False) -> None:
        """Raise the refusal a script answered, if any (``streams``: its cap counted event streams, not jobs)."""
        what, figure = answer[0], float(answer[1])
        if what == "ok":
            return
        if what == "rate_limited":
            raise RateLimited(f"rate limit: {self.s.rate_limit_per_min} requests a minute (bursts of "
                              f"{self.s.rate_limit_burst}); retry later", figure)
        if what == "too_many_jobs" and streams:
            raise RateLimited(f"{figure:.0f} of your event streams are open (the cap is "
                              f"{self.s.max_streams_per_caller}); close one first", 1.0, code="too_many_streams")
        if what == "too_many_jobs":
            raise RateLimited(f"{figure:.0f} of your jobs are still queued or running (the cap is "
                              f"{self.s.max_jobs_in_flight}); wait for them", 1.0, code="too_many_jobs")
        if what == "queue_full":
            raise Unavailable(f"the search queue is full ({self.s.max_queue_length} jobs waiting); retry shortly",
                              code="queue_full")
        raise Unavailable(f"the job could not be created ({what})")

    def _without_limits(self, job: Job, cargs: list[Any], exc: Exception) -> list[Any]:
        """The limits' own Redis is away: the job goes in uncounted (its record then names no in-flight set)."""
        self._opened(exc)
        job.inflight_key = None
        _, wargs = write_args(job, [("queued", {"id": job.id})], self.jobs.ttl, self.jobs.maxlen, create=True)
        return [cargs[0]] + wargs

    def _opened(self, exc: Exception) -> None:
        if self.down_since is None:
            log.warning("rate-limit store unavailable (%s): serving without limits", type(exc).__name__)
            self.down_since = time.time()

    # --- async face (the API, the Modal endpoint) ---
    async def limit(self, caller: Caller, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from the caller's bucket (``rate_limit_per_min``, bursts of ``rate_limit_burst``):
        the routes that make no job."""
        if self.s.rate_limit_per_min <= 0:
            return
        keys, args = self._limit_args(caller, 0, cost=cost)
        try:
            answer = await self._admit(keys=keys, args=args)
            self.down_since = None
        except Exception as exc:  # noqa: BLE001 - any trouble with the limits' Redis: serve on without limits
            self._opened(exc)
            return
        self._verdict(answer)

    async def open_stream(self, caller: Caller) -> str:
        """Count an event stream of ``caller``, in one script: a token from its bucket (the rate limit of every
        route) and a place among its open streams (``max_streams_per_caller``), held until ``close_stream`` or
        for ``stream_max_s`` at most (a stream lasts no longer, so a crashed API's entries lapse). RateLimited
        past either; the stream's token to close it with."""
        token = uuid.uuid4().hex
        cap = self.s.max_streams_per_caller
        if self.r is None or (cap <= 0 and self.s.rate_limit_per_min <= 0):
            return token
        keys, args = self._limit_args(caller, cap, token, time.time() + self.s.stream_max_s + 5)
        try:
            answer = await self._admit(keys=[keys[0], streams_key(caller.id)], args=args)
            self.down_since = None
        except Exception as exc:  # noqa: BLE001 - the limits' Redis away: serve on without limits, as admit does
            self._opened(exc)
            return token
        self._verdict(answer, streams=True)
        return token

    async def close_stream(self, caller: Caller, token: str) -> None:
        r: Any = self.r  # an async client here
        if r is not None and self.s.max_streams_per_caller > 0:
            try:
                await r.zrem(streams_key(caller.id), token)
            except Exception:  # noqa: BLE001 - the entry lapses at the stream's longest life anyway
                pass

    async def admit(self, caller: Caller, query: str, params: dict[str, Any], *,
                    request_id: str | None = None, job_id: str | None = None) -> Job:
        """Admit and queue one search job for ``caller``, or raise why not (InvalidRequest, RateLimited,
        Unavailable). The job counts against the caller's cap until a worker (or the reaper) ends it.
        ``job_id``: one the edge chose (an image query's picture is stored under it first)."""
        job, keys, largs, cargs = self._plan(caller, query, params, request_id, job_id)
        if self.shared:
            self._verdict(await self._admit_create(keys=keys, args=largs + cargs))
        else:
            try:
                self._verdict(await self._admit(keys=keys[:2], args=largs))
                self.down_since = None
            except (redis.RedisError, OSError) as exc:
                cargs = self._without_limits(job, cargs, exc)
            try:
                self._verdict(await self._create(keys=keys[2:], args=cargs))
            except BaseException:
                await self._unadmit(job)
                raise
        try:
            await self.jobs.send_created(job)  # type: ignore[union-attr]
        except BaseException:
            await self._unadmit(job)
            raise
        return job

    async def _unadmit(self, job: Job) -> None:
        if job.inflight_key:
            try:
                await self.r.zrem(job.inflight_key, job.id)
            except Exception:  # noqa: BLE001 - the entry expires at the job's deadline anyway
                pass

    async def state(self) -> str:
        try:
            await self.r.ping()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"down ({type(exc).__name__})"

    # --- sync face (the Cloud Function) ---
    def admit_sync(self, caller: Caller, query: str, params: dict[str, Any], *,
                   request_id: str | None = None) -> Job:
        """``admit`` through a sync client: the same plan and scripts."""
        job, keys, largs, cargs = self._plan(caller, query, params, request_id)
        if self.shared:
            self._verdict(self._admit_create(keys=keys, args=largs + cargs))
        else:
            try:
                self._verdict(self._admit(keys=keys[:2], args=largs))
            except (redis.RedisError, OSError) as exc:
                cargs = self._without_limits(job, cargs, exc)
            try:
                self._verdict(self._create(keys=keys[2:], args=cargs))
            except BaseException:
                self._unadmit_sync(job)
                raise
        try:
            self.jobs.send_created(job)  # type: ignore[union-attr]
        except BaseException:
            self._unadmit_sync(job)
            raise
        return job

    def _unadmit_sync(self, job: Job) -> None:
        if job.inflight_key:
            try:
                self.r.zrem(job.inflight_key, job.id)
            except redis.RedisError:  # the entry expires at the job's deadline anyway
                pass


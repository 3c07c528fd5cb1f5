"""Every Redis operation of a job's life, as a typed command, and the two executors that run them.

A command is a frozen dataclass. Its fields name what the operation needs; ``keys()`` and ``argv()`` build the
KEYS and ARGV of its Lua script from them (or, where ``SCRIPT`` is None, ``argv()`` is one plain Redis command:
the reads, and the blocking XREAD no script may hold); ``read()`` turns Redis's answer into a typed value. A
script's Lua names its KEYS and ARGV once, at its top, in the order its dataclass builds them.

``SyncExecutor`` (workers, the Cloud Function, the CLI) and ``AsyncExecutor`` (the API) run any command under
one policy, written once each: ``run`` answers the command's value or raises ``Unavailable`` when Redis can't
be reached or refuses; ``attempt`` is the best-effort form, which logs and answers a fallback (for what expires
by itself anyway: a caller's place, a progress event, a heartbeat). Nothing else in pipeline/ talks to Redis
about a job's life. tests/pipeline/test_commands.py checks each command's KEYS, ARGV and answer without Redis,
and both executors against a real one.

Scripts run through redis-py's ``Script`` (EVALSHA, loading the script again on NOSCRIPT: a new primary after a
failover has none cached). The open set, the queue lists and the workers' set are declared keys; the records
and heartbeats a walk reads are named by prefix (ARGV), which a single Redis allows (no cluster slots here)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import redis
import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from tenacity import RetryCallState

from pipeline.errors import Unavailable
from pipeline.jobs.keys import (
    OPEN_KEY,
    TERMINAL,
    WORKERS_KEY,
    cancel_key,
    events_key,
    heartbeat_key,
    job_key,
    picture_key,
    resent_key,
)
from pipeline.jobs.queues import UNACKED_KEY, waiting_lists
from pipeline.retry import last_error, retrying
from pipeline.types import Job

log = logging.getLogger(__name__)
T = TypeVar("T")
Beat = dict[str, Any]
ParsedEvent = tuple[str, str, dict[str, Any]]  # (stream entry id, event name, data)

# what "Redis can't be reached or refused" is, for both executors (a script error is a refusal too: the API has
# always answered 503 for any RedisError)
REDIS_DOWN = (redis.RedisError, OSError)


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


class Command(Generic[T]):
    """One Redis operation: ``SCRIPT`` with ``keys()``/``argv()``, or (SCRIPT None) the plain command ``argv()``
    sent with ``OPTIONS``; ``read`` makes the answer typed."""

    SCRIPT: ClassVar[str | None] = None
    OPTIONS: ClassVar[dict[str, Any]] = {}
    FENCED: ClassVar[bool] = False  # sent after a fence write, on its connection (see Replicated)

    def keys(self) -> list[str]:
        return []

    def argv(self) -> list[Any]:
        raise NotImplementedError

    def read(self, answer: Any) -> T:
        return answer  # type: ignore[no-any-return]


# --- admission: limits and creation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """A script's decision: ``what`` is ok, rate_limited, too_many_jobs, queue_full or exists; ``figure`` the
    number it refused by (seconds to wait, jobs counted, queue length)."""

    what: str
    figure: float = 0.0

    @property
    def ok(self) -> bool:
        return self.what == "ok"


def _verdict(answer: Any) -> Verdict:
    return Verdict(str(answer[0]), float(answer[1]))


# admit_check: a token from the bucket (Redis's own clock, so every API instance shares one), then the caller's
# members counted (those scored before ``now`` no longer count); nil or {refusal, figure}.
# admit_add: ``member`` counted until ``until`` (or until whoever ends it removes it).
# L: burst, rate a second (0: no rate limit), cost, cap (0: none), now, member, until: Limit.argv()'s order.
_LIMIT_FUNCTIONS = """
local function admit_check(kbucket, kcounted, L)
  local burst, rate, cost, cap, now = tonumber(L[1]), tonumber(L[2]), tonumber(L[3]), tonumber(L[4]), L[5]
  if rate > 0 then
    local t = redis.call('TIME')
    local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local b = redis.call('HMGET', kbucket, 'tokens', 'ts')
    local tokens, ts = tonumber(b[1]) or burst, tonumber(b[2]) or clock
    tokens = math.min(burst, tokens + math.max(0, clock - ts) * rate)
    local refused = tokens < cost
    if not refused then tokens = tokens - cost end
    redis.call('HSET', kbucket, 'tokens', tostring(tokens), 'ts', tostring(clock))
    redis.call('EXPIRE', kbucket, math.ceil(burst / rate) + 1)
    if refused then return {'rate_limited', tostring((cost - tokens) / rate)} end
  end
  if cap > 0 then
    redis.call('ZREMRANGEBYSCORE', kcounted, '-inf', now)
    local n = redis.call('ZCARD', kcounted)
    if n >= cap then return {'too_many_jobs', tostring(n)} end
  end
  return nil
end
local function admit_add(kcounted, L)
  if tonumber(L[4]) > 0 then
    redis.call('ZADD', kcounted, L[7], L[6])
    redis.call('EXPIREAT', kcounted, math.floor(tonumber(L[7])) + 60)
  end
end
local function slice(A, from, to)
  local out = {}
  for i = from, to or #A do out[#out + 1] = A[i] end
  return out
end
local function queue_full(K, from, cap)
  if tonumber(cap) > 0 then
    local n = 0
    for i = from, #K do n = n + redis.call('LLEN', K[i]) end
    if n >= tonumber(cap) then return {'queue_full', tostring(n)} end
  end
  return nil
end
"""
_LIMIT_ARGC = 7

# Writes a job's record and appends its events, unless the job already ended: the first end wins, so a job run
# twice (redelivered while its first worker still ran, cancelled or reaped meanwhile) ends once, with one set of
# results. A job that ends leaves the open set, and its query picture (if it had one) is dropped in the same
# script: nothing of an ended job but its record and events stays in Redis. A new one joins the open set, scored
# by its deadline. W: Write.argv()'s order (record JSON, ttl, maxlen, create "1"/"0", job id, deadline or "",
# then event name and data pairs). 1 if written, else 0.
_WRITE_FUNCTION = """
local function write_job(krec, kev, kopen, kimg, W)
  local record, ttl, maxlen, create, id, deadline = W[1], W[2], W[3], W[4], W[5], W[6]
  local cur = redis.call('GET', krec)
  if create == '1' then
    if cur then return 0 end
  else
    if not cur then return 0 end
    local st = cjson.decode(cur)['status']
    if st == 'done' or st == 'failed' then return 0 end
  end
  redis.call('SET', krec, record, 'EX', ttl)
  for i = 7, #W, 2 do
    redis.call('XADD', kev, 'MAXLEN', '~', maxlen, '*', 'event', W[i], 'data', W[i + 1])
  end
  if #W >= 7 then redis.call('EXPIRE', kev, ttl) end
  local st = cjson.decode(record)['status']
  if st == 'done' or st == 'failed' then
    redis.call('ZREM', kopen, id)
    redis.call('DEL', kimg)
  elseif deadline ~= '' then
    redis.call('ZADD', kopen, deadline, id)
  end
  return 1
end
"""


@dataclass(frozen=True)
class Limit(Command[Verdict]):
    """Take ``cost`` tokens from a caller's bucket (``rate`` a second, bursts of ``burst``; rate 0: no rate
    limit) and, under ``cap`` (0: none), count ``member`` in the caller's ``counted`` set until ``until``: the
    in-flight cap of jobs, or of event streams. The bare rate limit of the routes that make no job is cap 0."""

    bucket: str
    counted: str
    burst: float
    rate: float
    cost: float = 1.0
    cap: int = 0
    member: str = ""
    until: float = 0.0
    now: float = field(default_factory=time.time)

    SCRIPT = _LIMIT_FUNCTIONS + """
local kbucket, kcounted = KEYS[1], KEYS[2]
local r = admit_check(kbucket, kcounted, ARGV)
if r then return r end
admit_add(kcounted, ARGV)
return {'ok', '0'}
"""

    def keys(self) -> list[str]:
        return [self.bucket, self.counted]

    def argv(self) -> list[Any]:
        return [self.burst, self.rate, self.cost, self.cap, repr(self.now), self.member, repr(self.until)]

    def read(self, answer: Any) -> Verdict:
        return _verdict(answer)


@dataclass(frozen=True)
class Write(Command[bool]):
    """A job's record and its events at once, unless the job already ended (the first end wins); ``create``: the
    record must not exist yet. True if written. An end (status done or failed) also leaves the open set and
    drops the job's query picture."""

    job: Job
    ttl: int
    maxlen: int
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    create: bool = False

    SCRIPT = _WRITE_FUNCTION + """
local krec, kev, kopen, kimg = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
return write_job(krec, kev, kopen, kimg, ARGV)
"""

    def keys(self) -> list[str]:
        return [job_key(self.job.id), events_key(self.job.id), OPEN_KEY, picture_key(self.job.id)]

    def argv(self) -> list[Any]:
        job = self.job
        deadline = "" if job.deadline_at is None or job.status in TERMINAL else repr(job.deadline_at)
        out: list[Any] = [job.model_dump_json(exclude_none=True), self.ttl, self.maxlen, "1" if self.create else "0",
                          job.id, deadline]
        for name, data in self.events:
            out += [name, _dumps(data)]
        return out

    def read(self, answer: Any) -> bool:
        return bool(answer)


@dataclass(frozen=True)
class Create(Command[Verdict]):
    """A new job's record and first events (``write``, a creating Write), unless ``queue``'s waiting messages
    reach ``queue_cap`` (0: no cap). Where the limits live apart from the jobs."""

    write: Write
    queue: str
    queue_cap: int

    SCRIPT = _LIMIT_FUNCTIONS + _WRITE_FUNCTION + """
local krec, kev, kopen, kimg = KEYS[1], KEYS[2], KEYS[3], KEYS[4]  -- then the queue's waiting lists
local r = queue_full(KEYS, 5, ARGV[1])
if r then return r end
if write_job(krec, kev, kopen, kimg, slice(ARGV, 2)) == 0 then return {'exists', '0'} end
return {'ok', '0'}
"""

    def keys(self) -> list[str]:
        return self.write.keys() + list(waiting_lists(self.queue))

    def argv(self) -> list[Any]:
        return [self.queue_cap] + self.write.argv()

    def read(self, answer: Any) -> Verdict:
        return _verdict(answer)


@dataclass(frozen=True)
class AdmitCreate(Command[Verdict]):
    """``limit`` and ``create`` in one script, where the limits and the jobs share one Redis (the default): two
    requests at once can never both take the last place, and admission is one round trip."""

    limit: Limit
    create: Create

    SCRIPT = _LIMIT_FUNCTIONS + _WRITE_FUNCTION + f"""
local kbucket, kcounted, krec, kev, kopen, kimg = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local L = slice(ARGV, 1, {_LIMIT_ARGC})
local r = admit_check(kbucket, kcounted, L) or queue_full(KEYS, 7, ARGV[{_LIMIT_ARGC + 1}])
if r then return r end
if write_job(krec, kev, kopen, kimg, slice(ARGV, {_LIMIT_ARGC + 2})) == 0 then return {{'exists', '0'}} end
admit_add(kcounted, L)
return {{'ok', '0'}}
"""

    def keys(self) -> list[str]:
        return self.limit.keys() + self.create.keys()

    def argv(self) -> list[Any]:
        return self.limit.argv() + self.create.argv()

    def read(self, answer: Any) -> Verdict:
        return _verdict(answer)


@dataclass(frozen=True)
class Release(Command[bool]):
    """``member`` no longer counts in a caller's ``counted`` set (a job that ended, a stream that closed)."""

    counted: str
    member: str

    def argv(self) -> list[Any]:
        return ["ZREM", self.counted, self.member]

    def read(self, answer: Any) -> bool:
        return bool(answer)


@dataclass(frozen=True)
class Discard(Command[int]):
    """A created job the queue refused, or one no replica confirmed: its record, its events and its place in the
    open set go, so no job is left that nothing will run. With ``queue``, its message too, if it still waits
    among the newest ``UNSEND_SCAN`` of that queue's lists (a worker that took it meanwhile finds no record and
    skips it)."""

    job_id: str
    queue: str = ""

    SCRIPT = """
local krec, kev, kopen = KEYS[1], KEYS[2], KEYS[3]  -- then the queue's waiting lists, if any
redis.call('ZREM', kopen, ARGV[1])
local n = redis.call('DEL', krec, kev)
for i = 4, #KEYS do
  for _, m in ipairs(redis.call('LRANGE', KEYS[i], 0, tonumber(ARGV[2]) - 1)) do
    if string.find(m, ARGV[1], 1, true) then n = n + redis.call('LREM', KEYS[i], 1, m) end
  end
end
return n
"""
    UNSEND_SCAN: ClassVar[int] = 200  # kombu pushes at the head: a message just sent is among the first

    def keys(self) -> list[str]:
        lists = list(waiting_lists(self.queue)) if self.queue else []
        return [job_key(self.job_id), events_key(self.job_id), OPEN_KEY] + lists

    def argv(self) -> list[Any]:
        return [self.job_id, self.UNSEND_SCAN]

    def read(self, answer: Any) -> int:
        return int(answer)


# Acknowledged means replicated. WAIT blocks until that many replicas confirmed every write *its connection*
# made; the writes worth waiting for come from several (the record from the store's, the queue message from the
# broker's), so a fence is written first on the connection that then waits: a replica holding the fence holds
# everything the primary applied before it, whoever wrote it. The executors send FENCED commands so: the fence
# and the command in one pipeline, one connection.
FENCE_KEY = "imgsearch:replication:fence"
_FENCE_TTL_MS = 60_000


@dataclass(frozen=True)
class Replicated(Command[bool]):
    """Whether at least ``replicas`` replicas confirmed everything the primary applied so far, within
    ``timeout_ms`` (see FENCE_KEY)."""

    replicas: int
    timeout_ms: int

    FENCED: ClassVar[bool] = True

    def argv(self) -> list[Any]:
        return ["WAIT", self.replicas, self.timeout_ms]

    def read(self, answer: Any) -> bool:
        return int(answer) >= self.replicas


def not_replicated(replicas: int, timeout_ms: int) -> Unavailable:
    return Unavailable(f"no replica confirmed the job within {timeout_ms} ms (it needs {replicas}); retry shortly",
                       code="not_replicated")


# --- a job's record, events, picture and cancel flag -----------------------------------------------------------

@dataclass(frozen=True)
class Event(Command[bool]):
    """One progress event, unless the job ended (a second run of an ended job adds nothing to its stream)."""

    job_id: str
    name: str
    data: dict[str, Any]
    maxlen: int
    ttl: int

    SCRIPT = """
local krec, kev = KEYS[1], KEYS[2]
local name, data, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cur = redis.call('GET', krec)
if not cur then return 0 end
local st = cjson.decode(cur)['status']
if st == 'done' or st == 'failed' then return 0 end
redis.call('XADD', kev, 'MAXLEN', '~', maxlen, '*', 'event', name, 'data', data)
redis.call('EXPIRE', kev, ttl)
return 1
"""

    def keys(self) -> list[str]:
        return [job_key(self.job_id), events_key(self.job_id)]

    def argv(self) -> list[Any]:
        return [self.name, _dumps(self.data), self.maxlen, self.ttl]

    def read(self, answer: Any) -> bool:
        return bool(answer)


def parse_job(raw: bytes | str | None) -> Job | None:
    return None if raw is None else Job.model_validate_json(raw)


@dataclass(frozen=True)
class Load(Command[Job | None]):
    """The job's record, or None (unknown or expired)."""

    job_id: str

    def argv(self) -> list[Any]:
        return ["GET", job_key(self.job_id)]

    def read(self, answer: Any) -> Job | None:
        return parse_job(answer)


@dataclass(frozen=True)
class Picture(Command[bytes | None]):
    """An image query's picture as the API kept it, raw bytes whatever the client decodes (redis-py's own
    per-command switch), or None once it expired."""

    job_id: str
    OPTIONS = {NEVER_DECODE: True}

    def argv(self) -> list[Any]:
        return ["GET", picture_key(self.job_id)]

    def read(self, answer: Any) -> bytes | None:
        return None if answer is None else bytes(answer)


@dataclass(frozen=True)
class KeepPicture(Command[bool]):
    """An image query's checked picture, kept under the job for ``ttl`` (its record's)."""

    job_id: str
    data: bytes
    ttl: int

    def argv(self) -> list[Any]:
        return ["SET", picture_key(self.job_id), self.data, "EX", self.ttl]

    def read(self, answer: Any) -> bool:
        return bool(answer)


@dataclass(frozen=True)
class DropPicture(Command[int]):
    job_id: str

    def argv(self) -> list[Any]:
        return ["DEL", picture_key(self.job_id)]

    def read(self, answer: Any) -> int:
        return int(answer)


@dataclass(frozen=True)
class MarkCancelled(Command[bool]):
    """The cancel flag a running job's worker reads at each stage boundary."""

    job_id: str
    ttl: int

    def argv(self) -> list[Any]:
        return ["SET", cancel_key(self.job_id), "1", "EX", self.ttl]

    def read(self, answer: Any) -> bool:
        return bool(answer)


@dataclass(frozen=True)
class IsCancelled(Command[bool]):
    job_id: str

    def argv(self) -> list[Any]:
        return ["EXISTS", cancel_key(self.job_id)]

    def read(self, answer: Any) -> bool:
        return bool(answer)


def parse_events(entries: list[tuple[Any, dict[Any, Any]]]) -> list[ParsedEvent]:
    """``(stream id, event name, data)`` for each entry of an XRANGE/XREAD answer."""
    return [(str(entry_id), str(fields["event"]), json.loads(fields["data"])) for entry_id, fields in entries]


@dataclass(frozen=True)
class ReadEvents(Command[list[ParsedEvent]]):
    """The job's events after stream id ``after``, at most ``count``; with ``block_ms``, waiting that long for
    the first (a plain command: blocking has no place in a script)."""

    job_id: str
    after: str
    count: int
    block_ms: int | None = None

    def argv(self) -> list[Any]:
        block = [] if self.block_ms is None else ["BLOCK", self.block_ms]
        return ["XREAD", "COUNT", self.count, *block, "STREAMS", events_key(self.job_id), self.after]

    def read(self, answer: Any) -> list[ParsedEvent]:
        return parse_events(answer[0][1]) if answer else []


# --- recovery: rescue and reap ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stranded(Command[list[str]]):
    """The open jobs (deadline from ``now`` on, at most ``limit``) no worker will run on its own: queued while
    ``queue`` has no message waiting (their message is held by a worker about to start them, or lost), or
    running on a worker whose heartbeat expired."""

    queue: str
    now: float
    limit: int = 2000

    SCRIPT = """
local kopen = KEYS[1]  -- then the queue's waiting lists
local now, limit, job_prefix, beat_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ids = redis.call('ZRANGEBYSCORE', kopen, now, '+inf', 'LIMIT', 0, limit)
local waiting = 0
for i = 2, #KEYS do waiting = waiting + redis.call('LLEN', KEYS[i]) end
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('GET', job_prefix .. id)
  if raw then
    local job = cjson.decode(raw)
    if job['status'] == 'queued' and waiting == 0 then
      out[#out + 1] = id
    elseif job['status'] == 'running' and type(job['worker']) == 'string'
        and redis.call('EXISTS', beat_prefix .. job['worker']) == 0 then
      out[#out + 1] = id
    end
  end
end
return out
"""

    def keys(self) -> list[str]:
        return [OPEN_KEY, *waiting_lists(self.queue)]

    def argv(self) -> list[Any]:
        return [repr(self.now), self.limit, job_key(""), heartbeat_key("")]

    def read(self, answer: Any) -> list[str]:
        return [str(i) for i in answer]


@dataclass(frozen=True)
class Resent(Command[int]):
    """Count one more resend of a job (kept ``ttl`` seconds): how many times it was sent again."""

    job_id: str
    ttl: int

    SCRIPT = """
local kresent = KEYS[1]
local n = redis.call('INCR', kresent)
redis.call('EXPIRE', kresent, ARGV[1])
return n
"""

    def keys(self) -> list[str]:
        return [resent_key(self.job_id)]

    def argv(self) -> list[Any]:
        return [self.ttl]

    def read(self, answer: Any) -> int:
        return int(answer)


@dataclass(frozen=True)
class Overdue(Command[list[Job]]):
    """The open jobs whose deadline is at or before ``cutoff`` (at most ``limit``), still not ended; the open
    set's members that expired or ended by a path that did not leave it are dropped in the same script."""

    cutoff: float
    limit: int = 500

    SCRIPT = """
local kopen = KEYS[1]
local cutoff, limit, job_prefix = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', kopen, '-inf', cutoff, 'LIMIT', 0, limit)) do
  local raw = redis.call('GET', job_prefix .. id)
  local st = raw and cjson.decode(raw)['status']
  if not raw or st == 'done' or st == 'failed' then
    redis.call('ZREM', kopen, id)
  else
    out[#out + 1] = raw
  end
end
return out
"""

    def keys(self) -> list[str]:
        return [OPEN_KEY]

    def argv(self) -> list[Any]:
        return [repr(self.cutoff), self.limit, job_key("")]

    def read(self, answer: Any) -> list[Job]:
        return [Job.model_validate_json(raw) for raw in answer]


# --- the fleet: heartbeats and queue depth ---------------------------------------------------------------------

@dataclass(frozen=True)
class WriteBeat(Command[bool]):
    """A worker's heartbeat (``beat``, kept ``ttl`` seconds) and its name in the workers' set, at once: a reader
    sees both or neither."""

    name: str
    beat: Beat
    ttl: int

    SCRIPT = """
local kworkers, kbeat = KEYS[1], KEYS[2]
redis.call('SET', kbeat, ARGV[2], 'EX', ARGV[3])
redis.call('SADD', kworkers, ARGV[1])
return 1
"""

    def keys(self) -> list[str]:
        return [WORKERS_KEY, heartbeat_key(self.name)]

    def argv(self) -> list[Any]:
        return [self.name, json.dumps(self.beat), self.ttl]

    def read(self, answer: Any) -> bool:
        return bool(answer)


@dataclass(frozen=True)
class RemoveBeats(Command[int]):
    """Workers that stopped: their heartbeats and their names in the workers' set go at once."""

    names: tuple[str, ...]

    SCRIPT = """
local kworkers = KEYS[1]  -- then each worker's heartbeat
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
if #ARGV > 0 then redis.call('SREM', kworkers, unpack(ARGV)) end
return #ARGV
"""

    def keys(self) -> list[str]:
        return [WORKERS_KEY, *(heartbeat_key(n) for n in self.names)]

    def argv(self) -> list[Any]:
        return list(self.names)

    def read(self, answer: Any) -> int:
        return int(answer)


@dataclass(frozen=True)
class ReadBeats(Command[dict[str, Beat]]):
    """Every live worker's heartbeat by name; a name whose key expired (a worker that died without saying so)
    is dropped from the set in the same script, so a worker that beats at that moment (its SET and SADD are one
    script) is never dropped after its beat, and the set never outgrows the fleet."""

    SCRIPT = """
local kworkers, beat_prefix = KEYS[1], ARGV[1]
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', kworkers)) do
  local beat = redis.call('GET', beat_prefix .. name)
  if beat then out[#out + 1] = name; out[#out + 1] = beat else redis.call('SREM', kworkers, name) end
end
return out
"""

    def keys(self) -> list[str]:
        return [WORKERS_KEY]

    def argv(self) -> list[Any]:
        return [heartbeat_key("")]

    def read(self, answer: Any) -> dict[str, Beat]:
        return {str(n): json.loads(b) for n, b in zip(answer[::2], answer[1::2], strict=True)}


@dataclass(frozen=True)
class QueueDepths(Command[dict[str, tuple[int, int]]]):
    """Per queue: (waiting, reserved). Waiting sums the queue's priority lists; reserved counts the messages
    workers took and have not acknowledged, by routing key, in Redis (a scrape ships counts, not message
    bodies). Their sum is the backlog an autoscaler can trust. Celery routes a task to a queue by a routing key
    equal to the queue's name."""

    queues: tuple[str, ...]

    SCRIPT = """
local kunacked = KEYS[1]  -- then each queue's waiting lists, as many per queue
local counts = {}
for _, v in ipairs(redis.call('HVALS', kunacked)) do
  local ok, m = pcall(cjson.decode, v)
  if ok and type(m) == 'table' then
    local q = m[3]
    if type(q) ~= 'string' or q == '' then q = m[2] end
    if type(q) == 'string' then counts[q] = (counts[q] or 0) + 1 end
  end
end
local per = (#KEYS - 1) / #ARGV
local out = {}
for i, q in ipairs(ARGV) do
  local n = 0
  for j = 1, per do n = n + redis.call('LLEN', KEYS[1 + (i - 1) * per + j]) end
  out[#out + 1] = n; out[#out + 1] = counts[q] or 0
end
return out
"""

    def keys(self) -> list[str]:
        return [UNACKED_KEY, *(k for q in self.queues for k in waiting_lists(q))]

    def argv(self) -> list[Any]:
        return list(self.queues)

    def read(self, answer: Any) -> dict[str, tuple[int, int]]:
        return {q: (int(answer[2 * i]), int(answer[2 * i + 1])) for i, q in enumerate(self.queues)}


@dataclass(frozen=True)
class Ping(Command[bool]):
    def argv(self) -> list[Any]:
        return ["PING"]

    def read(self, answer: Any) -> bool:
        return bool(answer)


# --- the executors: one policy, written once per face ------------------------------------------------------------

def unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the job store (Redis) is unreachable; retry shortly ({type(exc).__name__})")


def _warn(what: str, exc: BaseException) -> None:
    log.warning("%s not done: Redis unreachable (%s)", what, type(exc.__cause__ or exc).__name__)


class SyncExecutor:
    """Runs commands through a sync client: ``run`` (the value, or Unavailable; with ``within_s``, connection
    failures are retried that long first: the end of a job that ran is worth a few seconds' wait while Redis
    restarts) and ``attempt`` (best effort: the value, or ``fallback``, logged)."""

    def __init__(self, client: redis.Redis, replicas: int = 0, wait_ms: int = 50) -> None:
        self.client = client
        self.replicas, self.wait_ms = replicas, wait_ms  # what ``replicated`` waits for
        self._scripts: dict[str, Any] = {}

    def _send(self, cmd: Command[Any]) -> Any:
        if cmd.FENCED:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(FENCE_KEY, "1", px=_FENCE_TTL_MS)
            pipe.execute_command(*cmd.argv(), **cmd.OPTIONS)
            return pipe.execute()[-1]
        if cmd.SCRIPT is None:
            return self.client.execute_command(*cmd.argv(), **cmd.OPTIONS)
        if (script := self._scripts.get(cmd.SCRIPT)) is None:
            script = self._scripts[cmd.SCRIPT] = self.client.register_script(cmd.SCRIPT)
        return script(keys=cmd.keys(), args=cmd.argv())

    def run(self, cmd: Command[T], within_s: float = 0.0) -> T:
        send: Callable[[Command[Any]], Any] = self._send
        if within_s > 0:
            def warn(state: RetryCallState) -> None:
                log.warning("%s: Redis unreachable (%s); again in %.1f s", type(cmd).__name__, last_error(state),
                            state.upcoming_sleep)

            again = retrying((redis.ConnectionError, redis.TimeoutError), within_s=within_s, first_s=0.1, max_s=2.0,
                             before_sleep=warn)
            send = lambda c: again(self._send, c)  # noqa: E731
        try:
            answer = send(cmd)
        except REDIS_DOWN as exc:
            raise unreachable(exc) from exc
        return cmd.read(answer)

    def attempt(self, cmd: Command[T], fallback: T) -> T:
        try:
            return self.run(cmd)
        except Unavailable as exc:
            _warn(type(cmd).__name__, exc)
            return fallback

    def replicated(self) -> bool:
        """Whether ``replicas`` replicas confirmed every write so far within ``wait_ms`` (True at once with no
        replicas asked for; False, logged, with Redis away)."""
        return self.replicas <= 0 or self.attempt(Replicated(self.replicas, self.wait_ms), False)


class AsyncExecutor:
    """``SyncExecutor``'s policy through an async client (the API's)."""

    def __init__(self, client: aioredis.Redis, replicas: int = 0, wait_ms: int = 50) -> None:
        self.client = client
        self.replicas, self.wait_ms = replicas, wait_ms
        self._scripts: dict[str, Any] = {}

    async def _send(self, cmd: Command[Any]) -> Any:
        if cmd.FENCED:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(FENCE_KEY, "1", px=_FENCE_TTL_MS)
            pipe.execute_command(*cmd.argv(), **cmd.OPTIONS)
            return (await pipe.execute())[-1]
        if cmd.SCRIPT is None:
            return await self.client.execute_command(*cmd.argv(), **cmd.OPTIONS)
        if (script := self._scripts.get(cmd.SCRIPT)) is None:
            script = self._scripts[cmd.SCRIPT] = self.client.register_script(cmd.SCRIPT)
        return await script(keys=cmd.keys(), args=cmd.argv())

    async def run(self, cmd: Command[T]) -> T:
        try:
            answer = await self._send(cmd)
        except REDIS_DOWN as exc:
            raise unreachable(exc) from exc
        return cmd.read(answer)

    async def attempt(self, cmd: Command[T], fallback: T) -> T:
        try:
            return await self.run(cmd)
        except Unavailable as exc:
            _warn(type(cmd).__name__, exc)
            return fallback

    async def replicated(self) -> bool:
        """``SyncExecutor.replicated`` through the async client."""
        return self.replicas <= 0 or await self.attempt(Replicated(self.replicas, self.wait_ms), False)

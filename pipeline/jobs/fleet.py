"""The workers' heartbeats: the writer a worker process runs, and the one reader that ``/readyz``, ``/metrics``,
the CLI's health check and the process stack all use.

A heartbeat is a JSON key with a TTL (``imgsearch:worker:{host}:{pid}``), renewed every third of it: the worker
is live, its engines loaded, its vector store answering. Each beat also adds the worker's name to one set
(``imgsearch:workers``), so a reader needs no keyspace scan: one script reads the set and its members' keys, and
drops the names whose key expired (a worker that died without saying so), so the set never outgrows the fleet.
Reading them (instead of asking Celery to broadcast) needs no worker to answer.

Also the fleet's queue depth as an autoscaler must read it: waiting plus reserved (``queue_depths``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from pipeline.jobs.keys import WORKERS_KEY, heartbeat_key

log = logging.getLogger(__name__)

Beat = dict[str, Any]


class Heartbeat:
    """Writes this worker's heartbeat from a daemon thread: ``info`` (fixed at start) merged with what
    ``state()`` says at each beat."""

    def __init__(self, client: redis.Redis, name: str, ttl: int, info: Beat,
                 state: Callable[[], Beat] = dict) -> None:
        self.r, self.name, self.key, self.ttl, self.info, self.state = client, name, heartbeat_key(name), ttl, info, state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One heartbeat now (a Redis failure is logged; the key expires meanwhile)."""
        try:
            pipe = self.r.pipeline(transaction=True)  # the key and the name together: a reader sees both or neither
            pipe.set(self.key, json.dumps({**self.info, **self.state(), "at": time.time()}), ex=self.ttl)
            pipe.sadd(WORKERS_KEY, self.name)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(max(self.ttl / 3, 0.5))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the key, so readers stop counting this worker at once (after the loop ended:
        a beat in flight would write the key again)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(self.key)
            pipe.srem(WORKERS_KEY, self.name)
            pipe.execute()
        except redis.RedisError:
            pass


def remove_stopped(r: redis.Redis, host: str, parent: int) -> int:
    """Remove the heartbeats a stopped worker's processes left: those of ``host`` written by process ``parent``
    or its children. Celery's cold shutdown (SIGTERM) sends no worker_shutdown and its pool's children may end
    without running their exit hooks, so the worker's main process does this once its pool has stopped. It reads
    the workers' set, as every reader does (no keyspace scan)."""
    gone = []
    for raw in r.smembers(WORKERS_KEY):  # type: ignore[union-attr]
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        beat = r.get(heartbeat_key(name))
        if beat and (b := json.loads(beat)).get("host") == host and parent in (b.get("pid"), b.get("parent")):
            gone.append(name)
    if not gone:
        return 0
    pipe = r.pipeline(transaction=True)
    pipe.delete(*(heartbeat_key(n) for n in gone))
    pipe.srem(WORKERS_KEY, *gone)
    return int(pipe.execute()[0])


def _parse(raw: list[Any]) -> list[Beat]:
    return [json.loads(b) for b in raw if b]


# KEYS: the workers' set. ARGV: the heartbeat keys' prefix. Every member's heartbeat; a member whose key expired is
# dropped in the same script, so a worker that beats again at that moment (its SET and SADD are one transaction)
# is never dropped after its beat.
_READ = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local beat = redis.call('GET', ARGV[1] .. name)
  if beat then out[#out + 1] = beat else redis.call('SREM', KEYS[1], name) end
end
return out
"""
_PREFIX = heartbeat_key("")


def read(r: redis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (sync client). Raises redis.RedisError when Redis is away."""
    return _parse(r.eval(_READ, 1, WORKERS_KEY, _PREFIX))  # type: ignore[arg-type]


async def aread(r: aioredis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (async client). Raises redis.RedisError when Redis is away."""
    return _parse(await r.eval(_READ, 1, WORKERS_KEY, _PREFIX))  # type: ignore[arg-type]


def serves_search(beat: Beat, queue: str) -> bool:
    """A worker that can answer a query now: engines loaded, on the search queue, its vector store answering."""
    return bool(beat.get("engines_loaded")) and queue in str(beat.get("queue", queue)).split(",") and \
        beat.get("vector_store", "ok") in ("ok", "unknown")


def warm_on_host(beats: list[Beat], host: str) -> bool:
    """A worker process on ``host`` with its engines loaded (they are warm by then): a container's health."""
    return any(b.get("host") == host and b.get("engines_loaded") for b in beats)


# --- queue depth: what an autoscaler should read ---
# Kombu's Redis transport keeps a queue as up to four lists (one per priority step: the queue's name, then the
# name + "\x06\x16" + 3, 6 and 9), and a message a worker has taken but not acknowledged (reserved, prefetched or
# running: acks late) in the hash ``unacked`` (delivery tag -> JSON [message, exchange, routing key]), indexed by
# the zset ``unacked_index``. A list's length alone misses every reserved message: a saturated fleet reads about
# zero. These names are kombu's defaults; tests/workers/test_depth.py checks them against workers/broker.py.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"

# Counts the unacked messages by routing key in Redis, so a scrape ships counts, not message bodies. Celery
# routes a task to a queue by a routing key equal to the queue's name (task_routes' {"queue": name}).
_UNACKED_BY_QUEUE = """
local counts = {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local ok, m = pcall(cjson.decode, v)
  if ok and type(m) == 'table' then
    local q = m[3]
    if type(q) ~= 'string' or q == '' then q = m[2] end
    if type(q) == 'string' then counts[q] = (counts[q] or 0) + 1 end
  end
end
local out = {}
for q, n in pairs(counts) do out[#out + 1] = q; out[#out + 1] = n end
return out
"""


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, one per priority step."""
    return [f"{queue}{PRIORITY_SEP}{p}" if p else queue for p in PRIORITY_STEPS]


async def queue_depths(r: aioredis.Redis, queues: list[str]) -> dict[str, tuple[int, int]]:
    """Per queue: (waiting, reserved). Waiting sums the queue's priority lists; reserved counts the messages
    workers took and have not acknowledged. Their sum is the backlog an autoscaler can trust."""
    pipe = r.pipeline(transaction=False)
    for q in queues:
        for key in priority_lists(q):
            pipe.llen(key)
    pipe.eval(_UNACKED_BY_QUEUE, 1, UNACKED_KEY)
    answers = await pipe.execute()
    flat = answers[-1]
    reserved = {str(k): int(n) for k, n in zip(flat[::2], flat[1::2], strict=True)}  # a job client: str
    steps = len(PRIORITY_STEPS)
    return {q: (int(sum(answers[i * steps:(i + 1) * steps])), reserved.get(q, 0)) for i, q in enumerate(queues)}

"""The workers' heartbeats: the writer a worker process runs, and the one reader that ``/readyz``, ``/metrics``,
the CLI's health check and the process stack all use.

A heartbeat is a JSON key with a TTL (``imgsearch:worker:{host}:{pid}``), renewed every third of it: the worker
is live, its engines loaded, its vector store answering. Each beat also adds the worker's name to one set
(``imgsearch:workers``), so a reader needs no keyspace scan: one script reads the set and its members' keys, and
drops the names whose key expired (a worker that died without saying so), so the set never outgrows the fleet.
Reading them (instead of asking Celery to broadcast) needs no worker to answer.

Also the fleet's queue depth as an autoscaler must read it: waiting plus reserved (``queue_depths``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from pipeline.jobs.commands import AsyncExecutor, Beat, QueueDepths, ReadBeats, RemoveBeats, SyncExecutor, WriteBeat

log = logging.getLogger(__name__)


class Heartbeat:
    """Writes this worker's heartbeat from a daemon thread: ``info`` (fixed at start) merged with what
    ``state()`` says at each beat."""

    def __init__(self, client: redis.Redis, name: str, ttl: int, info: Beat,
                 state: Callable[[], Beat] = dict) -> None:
        self.x, self.name, self.ttl, self.info, self.state = SyncExecutor(client), name, ttl, info, state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One heartbeat now (a Redis failure is logged; the key expires meanwhile)."""
        self.x.attempt(WriteBeat(self.name, {**self.info, **self.state(), "at": time.time()}, self.ttl), False)

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
        self.x.attempt(RemoveBeats((self.name,)), 0)


def remove_stopped(r: redis.Redis, host: str, parent: int) -> int:
    """Remove the heartbeats a stopped worker's processes left: those of ``host`` written by process ``parent``
    or its children. Celery's cold shutdown (SIGTERM) sends no worker_shutdown and its pool's children may end
    without running their exit hooks, so the worker's main process does this once its pool has stopped. It reads
    the workers' set, as every reader does (no keyspace scan)."""
    x = SyncExecutor(r)
    gone = tuple(name for name, b in x.run(ReadBeats()).items()
                 if b.get("host") == host and parent in (b.get("pid"), b.get("parent")))
    return x.run(RemoveBeats(gone)) if gone else 0


def read(r: redis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (sync client). Raises Unavailable when Redis is away."""
    return list(SyncExecutor(r).run(ReadBeats()).values())


async def aread(r: aioredis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (async client). Raises Unavailable when Redis is away."""
    return list((await AsyncExecutor(r).run(ReadBeats())).values())


def serves_search(beat: Beat, queue: str) -> bool:
    """A worker that can answer a query now: engines loaded, on the search queue, its vector store answering."""
    return bool(beat.get("engines_loaded")) and queue in str(beat.get("queue", queue)).split(",") and \
        beat.get("vector_store", "ok") in ("ok", "unknown")


def warm_on_host(beats: list[Beat], host: str) -> bool:
    """A worker process on ``host`` with its engines loaded (they are warm by then): a container's health."""
    return any(b.get("host") == host and b.get("engines_loaded") for b in beats)


async def queue_depths(r: aioredis.Redis, queues: list[str]) -> dict[str, tuple[int, int]]:
    """Per queue: (waiting, reserved), as an autoscaler must read it (see commands.QueueDepths)."""
    return await AsyncExecutor(r).run(QueueDepths(tuple(queues)))

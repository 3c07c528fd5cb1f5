"""The workers' heartbeats: the writer a worker process runs, and the one reader that ``/readyz``, ``/metrics``,
the CLI's health check and the process stack all use.

A heartbeat is a JSON key with a TTL (``imgsearch:worker:{host}:{pid}``), renewed every third of it: the worker
is live, its engines loaded, its vector store answering. Reading the keys (instead of asking Celery to
broadcast) costs one SCAN and one MGET, and needs no worker to answer."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from pipeline.jobs.keys import HEARTBEAT_PATTERN, heartbeat_key

log = logging.getLogger(__name__)

Beat = dict[str, Any]


class Heartbeat:
    """Writes this worker's heartbeat from a daemon thread: ``info`` (fixed at start) merged with what
    ``state()`` says at each beat."""

    def __init__(self, client: redis.Redis, name: str, ttl: int, info: Beat,
                 state: Callable[[], Beat] = dict) -> None:
        self.r, self.key, self.ttl, self.info, self.state = client, heartbeat_key(name), ttl, info, state
        self._stop = threading.Event()

    def beat(self) -> None:
        """One heartbeat now (a Redis failure is logged; the key expires meanwhile)."""
        try:
            self.r.set(self.key, json.dumps({**self.info, **self.state(), "at": time.time()}), ex=self.ttl)
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(max(self.ttl / 3, 0.5))

    def start(self) -> None:
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Stop beating and remove the key, so readers stop counting this worker at once."""
        self._stop.set()
        try:
            self.r.delete(self.key)
        except redis.RedisError:
            pass


def _parse(raw: list[Any]) -> list[Beat]:
    return [json.loads(b) for b in raw if b]


def read(r: redis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (sync client). Raises redis.RedisError when Redis is away."""
    keys = list(r.scan_iter(match=HEARTBEAT_PATTERN, count=100))
    return _parse(r.mget(keys)) if keys else []


async def aread(r: aioredis.Redis) -> list[Beat]:
    """Every live worker's heartbeat (async client). Raises redis.RedisError when Redis is away."""
    keys = [k async for k in r.scan_iter(match=HEARTBEAT_PATTERN, count=100)]
    return _parse(await r.mget(keys)) if keys else []


def serves_search(beat: Beat, queue: str) -> bool:
    """A worker that can answer a query now: engines loaded, on the search queue, its vector store answering."""
    return bool(beat.get("engines_loaded")) and beat.get("queue", queue) == queue and \
        beat.get("vector_store", "ok") in ("ok", "unknown")


def warm_on_host(beats: list[Beat], host: str) -> bool:
    """A worker process on ``host`` with its engines loaded (they are warm by then): a container's health."""
    return any(b.get("host") == host and b.get("engines_loaded") for b in beats)

"""Caches on the query path: a Redis cache of query results, a bounded Redis cache of hot BLIP features, and a
small in-process LRU in each worker. Values are JSON or our feature bytes, never pickle. A cache outage
slows search down and never fails it: errors count as misses, and after one the cache is skipped for a
few seconds so a hung Redis does not add a timeout to every query."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from numpy.typing import NDArray

from pipeline.types import SearchOutcome

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFIX = "imgsearch:cache"


def cache_client(url: str, timeout_s: float = 0.5, sentinel_password: Any = None) -> redis.Redis:
    """A Redis client for caches: short timeouts and no retries, since a miss is always an option."""
    from pipeline.redisconn import cache_connect

    return cache_connect(url, timeout_s, sentinel_password=sentinel_password)


class LocalLRU:
    """Decoded arrays by key, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.size = max_bytes, 0
        self._items: OrderedDict[str, NDArray[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> NDArray[Any] | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: str, arr: NDArray[Any]) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= old.nbytes
            self._items[key] = arr
            self.size += arr.nbytes
            while self.size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.size -= evicted.nbytes

    def discard_post(self, post_id: str) -> None:
        """Forget a post's entries (keys end with ``:{post_id}``, whatever model made them)."""
        with self._lock:
            for key in [k for k in self._items if k.endswith(f":{post_id}")]:
                self.size -= self._items.pop(key).nbytes

    def __len__(self) -> int:
        return len(self._items)


class _BestEffort:
    """Runs Redis calls, turning failures into a default and pausing calls for a while after one."""

    def __init__(self, client: redis.Redis, pause_s: float = 5.0) -> None:
        self.r, self.pause_s = client, pause_s
        self._down_until = 0.0

    def call(self, fn: Callable[[], T], default: T) -> T:
        if time.monotonic() < self._down_until:
            return default
        try:
            return fn()
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + self.pause_s
            log.warning("cache unavailable (%s); searching without it for %.0f s", type(exc).__name__, self.pause_s)
            return default


class FeatureCache(_BestEffort):
    """Hot BLIP features in Redis: each entry expires, and at most ``max_items`` are kept (oldest out first)."""

    def __init__(self, client: redis.Redis, ttl_s: int, max_items: int) -> None:
        super().__init__(client)
        self.ttl_s, self.max_items = ttl_s, max_items
        self.index_key = f"{PREFIX}:features:index"

    def key(self, version: str, post_id: str) -> str:
        return f"{PREFIX}:f:{version}:{post_id}"

    def get_many(self, version: str, ids: Sequence[str]) -> dict[str, bytes]:
        if not ids or not self.ttl_s:
            return {}
        empty: list[Any] = [None] * len(ids)
        values: list[Any] = self.call(lambda: list(self.r.mget([self.key(version, i) for i in ids])), empty)
        return {i: bytes(v) for i, v in zip(ids, values, strict=True) if v is not None}

    def put_many(self, version: str, items: dict[str, bytes]) -> None:
        if not items or not self.ttl_s or not self.max_items:
            return

        def write() -> None:
            now = time.time()
            pipe = self.r.pipeline(transaction=False)
            for post_id, data in items.items():
                key = self.key(version, post_id)
                pipe.set(key, data, ex=self.ttl_s)
                pipe.zadd(self.index_key, {key: now})
            pipe.zremrangebyscore(self.index_key, "-inf", now - self.ttl_s)  # entries that expired by themselves
            pipe.zcard(self.index_key)
            count = pipe.execute()[-1]
            if count > self.max_items:  # bounded: evict the oldest rather than grow
                popped: Any = self.r.zpopmin(self.index_key, count - self.max_items)
                old = [k for k, _ in popped]
                if old:
                    self.r.delete(*old)

        self.call(write, None)

    def delete(self, post_id: str) -> None:
        def drop() -> None:
            keys: list[Any] = list(self.r.scan_iter(match=f"{PREFIX}:f:*:{post_id}", count=1000))
            if keys:
                self.r.delete(*keys)
                self.r.zrem(self.index_key, *keys)

        self.call(drop, None)


class ResultCache(_BestEffort):
    """Whole query outcomes, keyed by who asked, the query, its parameters and the model versions; they expire.

    Per owner (the job's key) because a hit shows: it answers in a millisecond and says ``result_cache`` in the
    job's stats. Shared by every key, it would tell key B that someone ran B's exact query in the last minutes.
    Callers without a key (an open API, for local use) share one cache, as they share every job."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        super().__init__(client)
        self.ttl_s = ttl_s

    @staticmethod
    def key(query: str, params: dict[str, Any], versions: Sequence[str], owner: str | None = None) -> str:
        canon = json.dumps({"o": owner or "", "q": " ".join(query.split()), "p": params, "v": list(versions)},
                           sort_keys=True, separators=(",", ":"))
        return f"{PREFIX}:q:{hashlib.sha256(canon.encode()).hexdigest()}"

    def get(self, key: str) -> SearchOutcome | None:
        if not self.ttl_s:
            return None
        raw = self.call(lambda: self.r.get(key), None)
        return SearchOutcome.model_validate_json(raw) if raw else None

    def put(self, key: str, outcome: SearchOutcome) -> None:
        if self.ttl_s:
            data = outcome.model_dump_json(exclude={"timings"})
            self.call(lambda: self.r.set(key, data, ex=self.ttl_s), None)

    def clear(self) -> int:
        """Drop every cached outcome (after a takedown); returns how many."""
        def drop() -> int:
            keys: list[Any] = list(self.r.scan_iter(match=f"{PREFIX}:q:*", count=1000))
            return int(self.r.delete(*keys)) if keys else 0

        return self.call(drop, 0)


def decode_cached(data: bytes) -> NDArray[Any] | None:
    from pipeline import features
    from pipeline.errors import StoreError

    try:
        return features.decode(data)
    except StoreError:
        return None

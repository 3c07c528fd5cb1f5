"""What a worker process holds: engines, stores and a Searcher loaded once at process start, and a heartbeat
that tells the API (``/readyz``) which workers are live and what they loaded."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.cache import FeatureCache, LocalLRU, ResultCache, cache_client
from pipeline.jobs import JobWriter, heartbeat_key
from pipeline.search import Searcher
from pipeline.settings import Settings, get_settings
from pipeline.stores import make_blob_store, make_vector_store

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engines: Any  # engines.registry.Engines
    searcher: Searcher
    writer: JobWriter
    info: dict[str, Any]


_runtime: Runtime | None = None
_lock = threading.Lock()
_stop = threading.Event()


def load(settings: Settings | None = None) -> Runtime:
    """Load the engines and stores of this process (once) and start its heartbeat."""
    global _runtime
    with _lock:
        if _runtime is None:
            from engines.registry import load_engines

            settings = settings or get_settings()
            t0 = time.perf_counter()
            engines = load_engines(settings)
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_socket_timeout_s,
                                          socket_connect_timeout=settings.redis_socket_timeout_s)
            caches = cache_client(settings.redis_url)
            searcher = Searcher(settings, engines.text, make_vector_store(settings), make_blob_store(settings),
                                engines.reranker,
                                feature_cache=FeatureCache(caches, settings.cache_features_ttl_s,
                                                           settings.cache_features_max)
                                if settings.feature_cache_on else None,
                                results=ResultCache(caches, settings.cache_results_ttl_s),
                                local=LocalLRU(settings.cache_local_mb << 20))
            loaded = time.perf_counter() - t0
            # before the heartbeat, so /readyz counts this worker only once its first query would be warm
            warm = searcher.warm_up() if settings.warm_up else {}
            info = {"host": socket.gethostname(), "pid": os.getpid(), "engines_loaded": True,
                    "queue": os.environ.get("IMGSEARCH_WORKER_QUEUE", settings.search_queue),
                    "load_s": round(loaded, 3), "warm_up_ms": warm, **engines.describe()}
            limits = redis.Redis.from_url(settings.limits_redis_url, socket_timeout=1, socket_connect_timeout=1) \
                if settings.limits_redis_url else None
            _runtime = Runtime(settings, engines, searcher,
                               JobWriter(client, settings.job_ttl_s, settings.events_maxlen, limits,
                                         worker=f"{info['host']}:{info['pid']}"), info)
            threading.Thread(target=_heartbeat, args=(_runtime,), name="heartbeat", daemon=True).start()
            log.info("worker process ready: %s", info)
        return _runtime


def get() -> Runtime:
    return _runtime or load()


def _store_state(rt: Runtime) -> str:
    if rt.searcher.breakers["vector_store"].state == "open":  # known down: leave it alone until the trial
        return "down (circuit open)"
    try:
        rt.searcher.vectors.stats()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure: the store is not usable from here
        return f"down ({type(exc).__name__})"


def _heartbeat(rt: Runtime) -> None:
    """A key with a TTL, renewed every third of it: this worker is live, its engines loaded, its vector store
    answering (checked every ``store_check_s``)."""
    key = heartbeat_key(f"{rt.info['host']}:{rt.info['pid']}")
    ttl = rt.settings.heartbeat_ttl_s
    checked, state = 0.0, "unknown"
    while not _stop.is_set():
        if time.monotonic() - checked > 30:
            state, checked = _store_state(rt), time.monotonic()
        try:
            breakers = {name: b.state for name, b in rt.searcher.breakers.items()}
            rt.writer.r.set(key, json.dumps({**rt.info, "vector_store": state, "breakers": breakers,
                                             "at": time.time()}), ex=ttl)
        except redis.RedisError as exc:  # Redis away: keep trying; the key expires meanwhile
            log.warning("heartbeat failed: %s", exc)
        _stop.wait(max(ttl / 3, 0.5))


def shutdown() -> None:
    _stop.set()
    if _runtime is not None:
        try:
            _runtime.writer.r.delete(heartbeat_key(f"{_runtime.info['host']}:{_runtime.info['pid']}"))
        except redis.RedisError:
            pass

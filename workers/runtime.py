"""What a worker process holds: engines, stores and a Searcher loaded once at process start, and a heartbeat
that tells the API (``/readyz``) which workers are live and what they loaded."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.jobs.fleet import Heartbeat
from pipeline.jobs.store import JobStore, connect
from pipeline.search.searcher import Searcher
from pipeline.settings import WorkerSettings, get_worker_settings
from pipeline.stores.bundle import Stores

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: WorkerSettings
    engines: Any  # engines.registry.Engines
    searcher: Searcher
    stores: Stores  # built once; search, ingest and takedown share them
    store: JobStore
    info: dict[str, Any]
    heartbeat: Heartbeat | None = None


_runtime: Runtime | None = None
_lock = threading.Lock()
_queue: str | None = None  # the queue this process's worker serves (set by `imgsearch worker` before it starts)


def serve(queue: str) -> None:
    """Name the queue this worker serves, before its processes load (prefork children inherit it)."""
    global _queue
    _queue = queue


def load(settings: WorkerSettings | None = None) -> Runtime:
    """Load the engines and stores of this process (once) and start its heartbeat."""
    global _runtime
    with _lock:
        if _runtime is None:
            from engines.registry import load_engines

            settings = settings or get_worker_settings()
            t0 = time.perf_counter()
            engines = load_engines(settings)
            client = connect(settings.redis_url, settings.redis_socket_timeout_s)
            stores = Stores.build(settings)
            searcher = Searcher.over(settings, engines.text, engines.reranker, stores, image=engines.image)
            loaded = time.perf_counter() - t0
            # before the heartbeat, so /readyz counts this worker only once its first query would be warm
            warm = searcher.warm_up() if settings.warm_up else {}
            info = {"host": settings.host, "pid": os.getpid(), "parent": os.getppid(), "engines_loaded": True,
                    "queue": _queue or settings.search_queue,
                    "load_s": round(loaded, 3), "warm_up_ms": warm, **engines.describe()}
            limits = connect(settings.limits_redis_url, 1) if settings.limits_redis_url else None
            name = f"{info['host']}:{info['pid']}"
            _runtime = Runtime(settings, engines, searcher, stores,
                               JobStore.from_settings(settings, client, limits=limits, worker=name), info)
            _runtime.heartbeat = Heartbeat(client, name, settings.heartbeat_ttl_s, info, _state(_runtime))
            _runtime.heartbeat.start()
            log.info("worker process ready: %s", info)
        return _runtime


def get() -> Runtime:
    return _runtime or load()


def _store_state(rt: Runtime) -> str:
    if rt.searcher.circuits()["vector_store"] == "open":  # known down: leave it alone until the trial
        return "down (circuit open)"
    try:
        rt.stores.vectors.stats()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure: the store is not usable from here
        return f"down ({type(exc).__name__})"


def _state(rt: Runtime) -> Any:
    """What each heartbeat adds to the fixed info: the circuits' states, and whether the vector store answers
    (checked every 30 s, not every beat: a stats call is not free on a remote store)."""
    checked, state = 0.0, "unknown"

    def now() -> dict[str, Any]:
        nonlocal checked, state
        if time.monotonic() - checked > 30:
            state, checked = _store_state(rt), time.monotonic()
        return {"vector_store": state, "breakers": rt.searcher.circuits()}

    return now


def shutdown() -> None:
    if _runtime is not None and _runtime.heartbeat is not None:
        _runtime.heartbeat.stop()

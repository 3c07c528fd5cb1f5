"""What a worker process holds: engines, stores and a Searcher loaded once at process start, the ingest embedders and
ledger loaded on first use, and a heartbeat that tells the API (``/readyz``) which workers are live and what they
loaded. All of it is one ``Runtime``, built whole by ``load``; ``shutdown`` stops its threads."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.jobs.fleet import Heartbeat
from pipeline.jobs.store import JobStore, connect
from pipeline.protocols import ImageEncoder, Reranker
from pipeline.search.searcher import Searcher
from pipeline.settings import WorkerSettings, get_ingest_settings, get_worker_settings
from pipeline.stores.bundle import Stores

if TYPE_CHECKING:
    from engines.registry import Engines
    from pipeline.ingest import Ledger

log = logging.getLogger(__name__)
T = TypeVar("T")


class Once(Generic[T]):
    """A part of the runtime that only some tasks use, loaded by the first of them (once per process)."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load, self._lock = load, threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._load()
            return self._value


@dataclass
class Runtime:
    settings: WorkerSettings
    engines: Engines
    stores: Stores  # built once; search, ingest and takedown share them
    searcher: Searcher
    store: JobStore
    heartbeat: Heartbeat
    info: dict[str, Any]
    # ingest's embed streams (engines.registry.load_image_engines) and the ledger of fanned-out batches (it caches
    # the near-duplicate index): loaded by the first ingest task, not at start
    embedders: Once[list[tuple[ImageEncoder, Reranker]]] = field(repr=False)
    ledger: Once[Ledger] = field(repr=False)

    def feature_versions(self) -> list[str]:
        """The reranker versions whose stored features this worker reads (what a takedown deletes)."""
        return [self.engines.reranker.version]

    def close(self) -> None:
        """Stop the heartbeat (its key goes with it) and the Searcher's threads."""
        self.heartbeat.stop()
        self.searcher.close()


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
            _runtime = _build(settings or get_worker_settings())
            _runtime.heartbeat.start()
            log.info("worker process ready: %s", _runtime.info)
        return _runtime


def _build(settings: WorkerSettings) -> Runtime:
    from engines.registry import load_engines, load_image_engines
    from pipeline.ingest import Ledger

    t0 = time.perf_counter()
    engines = load_engines(settings)
    client = connect(settings.redis_url, settings.redis_socket_timeout_s, sentinel_password=settings.redis_sentinel_password)
    stores = Stores.build(settings)
    searcher = Searcher.over(settings, engines.text, engines.reranker, stores, image=engines.image)
    loaded = time.perf_counter() - t0
    # before the heartbeat, so /readyz counts this worker only once its first query would be warm
    warm = searcher.warm_up() if settings.warm_up else {}
    info = {"host": settings.host, "pid": os.getpid(), "parent": os.getppid(), "engines_loaded": True,
            "queue": _queue or settings.search_queue,
            "load_s": round(loaded, 3), "warm_up_ms": warm, **engines.describe()}
    limits = connect(settings.limits_redis_url, 1, sentinel_password=settings.redis_sentinel_password) \
        if settings.limits_redis_url else None
    name = f"{info['host']}:{info['pid']}"
    return Runtime(settings, engines, stores, searcher,
                   JobStore.from_settings(settings, client, limits=limits, worker=name),
                   Heartbeat(client, name, settings.heartbeat_ttl_s, info, _state(searcher, stores)), info,
                   embedders=Once(lambda: load_image_engines(get_ingest_settings(), engines)),
                   ledger=Once(lambda: Ledger.open(settings)))


def get() -> Runtime:
    return _runtime or load()


def _store_state(searcher: Searcher, stores: Stores) -> str:
    if searcher.circuits()["vector_store"] == "open":  # known down: leave it alone until the trial
        return "down (circuit open)"
    try:
        stores.vectors.stats()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure: the store is not usable from here
        return f"down ({type(exc).__name__})"


def _state(searcher: Searcher, stores: Stores) -> Callable[[], dict[str, Any]]:
    """What each heartbeat adds to the fixed info: the circuits' states, and whether the vector store answers
    (checked every 30 s, not every beat: a stats call is not free on a remote store)."""
    checked, state = 0.0, "unknown"

    def now() -> dict[str, Any]:
        nonlocal checked, state
        if time.monotonic() - checked > 30:
            state, checked = _store_state(searcher, stores), time.monotonic()
        return {"vector_store": state, "breakers": searcher.circuits()}

    return now


def shutdown() -> None:
    if _runtime is not None:
        _runtime.close()

"""What a worker process holds, in-process against a real Redis: the Runtime is built whole (typed engines that
share one model lock, the Searcher over the stores, the heartbeat), and closing it takes the heartbeat's key and
every thread it started with it."""

from __future__ import annotations

import threading

import redis

from cli import stack
from engines.registry import Engines
from pipeline.jobs import fleet
from pipeline.jobs.store import connect
from pipeline.types import SearchParams
from tests.conftest import make_settings
from workers import runtime


def _ours(threads: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in threads if t.name.startswith(("batch-", "store_", "fetch_", "heartbeat"))}


def test_the_runtime_is_built_whole_and_close_stops_its_threads(redis_server, store_dir, tiny_models) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url(14)
    redis.Redis.from_url(url).flushdb()
    s = make_settings(store_dir, tiny_models, url, batch_max=4, warm_up=False, heartbeat_ttl_s=600)
    before = set(threading.enumerate())  # other tests' Searchers, never closed
    rt = runtime._build(s)  # noqa: SLF001 - load() would keep it as this process's runtime
    rt.heartbeat.start()
    try:
        assert isinstance(rt.engines, Engines)
        assert rt.engines.text.lock is rt.engines.lock is rt.engines.reranker.lock  # type: ignore[attr-defined]
        assert rt.feature_versions() == [rt.engines.reranker.version]
        stack.wait_for(lambda: len(fleet.read(connect(url, 2))) == 1, 30, "the runtime's heartbeat")
        assert rt.searcher.search(SearchParams(query="a red circle", limit=3)).results
        started = {t.name.split("_")[0] for t in _ours(set(threading.enumerate()) - before)}
        assert started == {"batch-encode", "batch-rerank", "store", "fetch", "heartbeat"}, started
    finally:
        rt.close()
    assert fleet.read(connect(url, 2)) == []  # gone at once, not at its TTL
    stack.wait_for(lambda: not _ours(set(threading.enumerate()) - before), 10, "the runtime's threads to end")


def test_a_part_only_ingest_uses_loads_once_on_first_use() -> None:
    calls: list[int] = []
    once = runtime.Once(lambda: calls.append(1) or ["embedders"])
    assert calls == []  # nothing at start
    with_threads = [threading.Thread(target=once.get) for _ in range(4)]
    for t in with_threads:
        t.start()
    for t in with_threads:
        t.join(10)
    assert once.get() == ["embedders"] and calls == [1]

"""Caches on the query path against a real Redis: bounded, pickle-free, and never a reason to fail."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from pipeline.cache import FeatureCache, LocalLRU, ResultCache, cache_client
from pipeline.search.searcher import Searcher
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.types import SearchParams
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def test_local_lru_is_bounded_by_bytes() -> None:
    lru = LocalLRU(max_bytes=10 * 800)
    for i in range(25):
        lru.put(str(i), np.zeros(200, np.float32))  # 800 bytes each
        lru.get("0")  # keep 0 hot
    assert len(lru) == 10 and lru.size <= 8000
    assert lru.get("0") is not None and lru.get("1") is None and lru.get("24") is not None


def test_feature_cache_is_bounded(redis_server) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_server.url(8))
    r.flushdb()
    cache = FeatureCache(r, ttl_s=60, max_items=20)
    for start in range(0, 50, 10):
        cache.put_many("v1", {f"p{i}": f"data{i}".encode() for i in range(start, start + 10)})
    keys = list(r.scan_iter(match="imgsearch:cache:f:*"))
    assert len(keys) == 20 and r.zcard(cache.index_key) == 20
    assert cache.get_many("v1", ["p49", "p0"]) == {"p49": b"data49"}  # the oldest went first
    assert 0 < r.ttl(cache.key("v1", "p49")) <= 60
    cache.delete("p49")
    assert cache.get_many("v1", ["p49"]) == {}


def test_result_cache_round_trip_and_key(redis_server) -> None:  # type: ignore[no-untyped-def]
    from pipeline.types import Match, Result, SearchOutcome

    cache = ResultCache(redis.Redis.from_url(redis_server.url(8)), ttl_s=30)
    k = cache.key("a  red circle", {"limit": 5}, ["s1", "b1"])
    assert k == cache.key("a red circle", {"limit": 5}, ["s1", "b1"])  # whitespace does not matter
    assert k != cache.key("a red circle", {"limit": 6}, ["s1", "b1"]) != cache.key("a red circle", {"limit": 5}, ["s2", "b1"])
    out = SearchOutcome(results=[Result(id="p1", score=0.5, itm=0.6, cosine=0.2)], candidates=[Match(id="p1", score=0.9)])
    cache.put(k, out)
    assert cache.get(k) == out
    raw = redis.Redis.from_url(redis_server.url(8)).get(k)
    assert raw is not None and raw.startswith(b"{")  # JSON, not pickle


def test_dead_cache_never_fails_search(store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(store_dir, tiny_models)
    dead = cache_client("redis://127.0.0.1:1/0")
    plain = Searcher(s, engines.text, make_vector_store(s), make_blob_store(s), engines.reranker)
    cached = Searcher(s, engines.text, make_vector_store(s), make_blob_store(s), engines.reranker,
                      feature_cache=FeatureCache(dead, 60, 100), results=ResultCache(dead, 60))
    t0 = time.monotonic()
    for _ in range(3):
        got = cached.search(SearchParams(query="a red circle"))
    assert time.monotonic() - t0 < 2  # a dead cache costs no retries, and is then skipped for a while
    want = plain.search(SearchParams(query="a red circle"))
    assert [r.id for r in got.results] == [r.id for r in want.results]
    assert got.stats["features_blob"] == 32


def test_features_come_from_the_closest_cache(redis_server, store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_server.url(9))
    r.flushdb()
    s = make_settings(store_dir, tiny_models)

    def searcher(results_ttl: int = 0) -> Searcher:
        return Searcher(s, engines.text, make_vector_store(s), make_blob_store(s), engines.reranker,
                        feature_cache=FeatureCache(r, 60, 1000), results=ResultCache(r, results_ttl),
                        local=LocalLRU(64 << 20))

    first = searcher()
    cold = first.search(SearchParams(query="a blue square"))
    assert cold.stats == {"features_local": 0, "features_redis": 0, "features_blob": 32}
    warm = first.search(SearchParams(query="a blue square"))
    assert warm.stats["features_local"] == 32
    other = searcher().search(SearchParams(query="a blue square"))  # a new worker: empty LRU, warm Redis
    assert other.stats == {"features_local": 0, "features_redis": 32, "features_blob": 0}
    assert [x.id for x in other.results] == [x.id for x in cold.results]
    np.testing.assert_allclose([x.score for x in other.results], [x.score for x in cold.results], atol=1e-6)

    with_results = searcher(results_ttl=60)
    a = with_results.search(SearchParams(query="a yellow circle", limit=5))
    b = with_results.search(SearchParams(query="a yellow circle", limit=5))
    assert b.stats == {"result_cache": 1} and "cache" in b.timings
    assert [x.id for x in b.results] == [x.id for x in a.results]

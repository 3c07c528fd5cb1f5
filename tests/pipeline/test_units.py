"""Small pure pieces: fusion, the feature codec, settings, the blob store."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import features
from pipeline.errors import InvalidRequest, StoreError
from pipeline.search.fusion import fuse, rank
from pipeline.settings import Settings
from pipeline.stores.local_blob import LocalBlobStore


def test_fusion_weights_and_rank() -> None:
    itm = np.array([0.9, 0.1, 0.5], np.float32)
    cos = np.array([0.0, 1.0, 0.5], np.float32)
    fused = fuse(itm, cos)
    np.testing.assert_allclose(fused, [0.63, 0.37, 0.5], rtol=1e-6)
    assert rank(fused).tolist() == [0, 2, 1]
    assert rank(fuse(itm, cos, 0.0, 1.0)).tolist() == [1, 2, 0]


def test_rank_ties_keep_input_order() -> None:
    assert rank(np.array([0.5, 0.7, 0.5, 0.7], np.float32)).tolist() == [1, 3, 0, 2]


def test_feature_codec_round_trip_and_corruption() -> None:
    arr = np.random.default_rng(0).standard_normal((5, 17, 8)).astype(np.float32)
    blob = features.encode(arr)
    back = features.decode(blob)
    assert back.dtype == np.float16 and back.shape == arr.shape
    np.testing.assert_allclose(back, arr, atol=2e-3, rtol=1e-3)
    with pytest.raises(StoreError, match="truncated"):
        features.decode(blob[:-2])
    with pytest.raises(StoreError, match="magic"):
        features.decode(b"garbage-bytes")
    assert features.decode(features.encode(arr, "float32")).dtype == np.float32


def test_settings_take_the_original_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("PINECONE_API_KEY", "pk-secret")
    monkeypatch.setenv("PINECONE_INDEX_NAME", "memes")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "proj")
    s = Settings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.pinecone_index_name == "memes" and s.google_cloud_project == "proj"
    assert s.pinecone_api_key is not None and s.pinecone_api_key.get_secret_value() == "pk-secret"
    assert "pk-secret" not in repr(s)  # secrets never reach logs
    monkeypatch.setenv("IMGSEARCH_REDIS_URL", "redis://ours:1/0")
    assert Settings().redis_url == "redis://ours:1/0"  # the prefixed name wins


def test_settings_refuse_unsafe_values() -> None:
    with pytest.raises(ValueError, match="rerank_k"):
        Settings(top_k=8, rerank_k=16)
    with pytest.raises(ValueError, match="weight"):
        Settings(itm_weight=0, cosine_weight=0)
    assert Settings(job_deadline_s=10).visibility_timeout > 10


def test_local_blob_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalBlobStore(tmp_path)
    assert store.get("features/v1/abc") is None and not store.exists("features/v1/abc")
    store.put("features/v1/abc", b"\x00\x01")
    assert store.get("features/v1/abc") == b"\x00\x01" and store.exists("features/v1/abc")
    store.put("features/v1/abc", b"new")
    assert store.get("features/v1/abc") == b"new"
    store.delete("features/v1/abc")
    assert not store.exists("features/v1/abc")
    store.delete("features/v1/abc")  # deleting a missing key is fine
    for bad in ("../escape", "/abs", "a/../../b", ""):
        with pytest.raises(InvalidRequest):
            store.put(bad, b"x")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))


def test_redis_feature_cache_only_in_front_of_remote_blobs() -> None:
    assert not Settings().feature_cache_on  # a local folder beats Redis for 1 MB values
    assert Settings(blob_store="gcs").feature_cache_on
    assert Settings(caches={"features": "on"}).feature_cache_on
    assert not Settings(blob_store="gcs", caches={"features": "off"}).feature_cache_on


def test_the_breaker_opens_after_failures_in_a_row_then_lets_one_trial_through() -> None:
    from pipeline.breaker import Breaker, CircuitOpen
    from pipeline.errors import InvalidRequest, Unavailable

    now = [0.0]
    b = Breaker("vector_store", failures=3, reset_s=10, clock=lambda: now[0])

    def fail() -> None:
        raise Unavailable("down")

    def mistaken() -> None:
        raise InvalidRequest("bad filter")

    for _ in range(2):
        with pytest.raises(Unavailable):
            b.call(fail)
    assert b.call(lambda: 7) == 7 and b.state == "closed"  # a success resets the count
    with pytest.raises(InvalidRequest):
        b.call(mistaken)  # a caller's mistake is not the store's failure
    for _ in range(3):
        with pytest.raises(Unavailable):
            b.call(fail)
    assert b.state == "open" and b.opened == 1
    with pytest.raises(CircuitOpen) as exc:
        b.call(lambda: 7)
    assert exc.value.code == "vector_store_unavailable" and "10.0 s" in exc.value.message
    now[0] = 10.5  # half-open: one trial; a second caller meanwhile is refused
    with b.attempt():
        assert b.state == "half_open"
        with pytest.raises(CircuitOpen):
            b.call(lambda: 7)
    assert b.state == "closed"
    for _ in range(3):
        with pytest.raises(Unavailable):
            b.call(fail)
    now[0] = 21.0
    with pytest.raises(Unavailable):
        b.call(fail)  # the trial failed: open again, for another reset_s
    assert b.state == "open" and b.opened == 3


def test_the_job_store_refuses_a_client_that_answers_bytes() -> None:
    import redis

    from pipeline.jobs.store import JobStore, connect

    with pytest.raises(TypeError, match="decode_responses"):
        JobStore(redis.Redis.from_url("redis://127.0.0.1:1/0"), 60, 64)  # no server needed: nothing is sent
    assert JobStore(connect("redis://127.0.0.1:1/0", 1), 60, 64).r.get_connection_kwargs()["decode_responses"]

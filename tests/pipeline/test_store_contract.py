"""One contract, every backend: the embedded store and Pinecone (the real client against the stand-in) for
vectors; a folder and GCS (the real client against the emulator) for blobs."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline import filters
from pipeline.errors import ImgSearchError, StoreError, Unavailable
from pipeline.stores.local_blob import LocalBlobStore
from pipeline.stores.local_vector import LocalVectorStore

pytestmark = pytest.mark.contract
FILTERS = [
    {"subreddit": "memes"},
    {"subreddit": {"$in": ["memes", "me_irl"]}, "over_18": False},
    {"$or": [{"score": {"$lt": 20}}, {"score": {"$gte": 180}}]},
    {"$and": [{"score": {"$gt": 50}}, {"subreddit": {"$ne": "memes"}}, {"subreddit": {"$nin": ["me_irl"]}}]},
    {"score": {"$lte": 30}, "over_18": {"$eq": True}},
    {"flair": {"$ne": "oc"}},  # a field only some vectors have
    {"flair": "oc"},
]


def _data(n: int = 200, d: int = 16, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = [{"subreddit": ["memes", "dankmemes", "me_irl"][i % 3], "score": i, "over_18": i % 5 == 0,
             **({"flair": "oc" if i % 2 else "meta"} if i % 4 == 0 else {})} for i in range(n)]
    return x, meta


@pytest.fixture(params=["local", "pinecone"])
def vectors(request, tmp_path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    if request.param == "local":
        yield LocalVectorStore(tmp_path, exact_below=50)  # small, so both the exact and the graph path run
    else:
        from pipeline.stores.pinecone_store import PineconeVectorStore

        standin = request.getfixturevalue("pinecone_standin")
        standin.data.clear()
        standin.fail_next.clear()
        yield PineconeVectorStore(standin.api_key, host=standin.host, timeout=5, retries=3)


def _brute(x, meta, q, k, flt=None):  # type: ignore[no-untyped-def]
    ok = [i for i in range(len(x)) if filters.matches(flt, meta[i])]
    return [f"v{ok[i]}" for i in np.argsort(-(x[ok] @ q), kind="stable")[:k]]


def test_query_nearest_with_metadata(vectors) -> None:  # type: ignore[no-untyped-def]
    x, meta = _data()
    assert vectors.upsert([(f"v{i}", x[i], meta[i]) for i in range(len(x))]) == len(x)
    hits = vectors.query(x[7], 5)
    assert hits[0].id == "v7" and hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].metadata == meta[7]
    assert [h.id for h in hits] == _brute(x, meta, x[7], 5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert vectors.stats()["total_vector_count"] == len(x)


@pytest.mark.parametrize("flt", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_equal_brute_force(vectors, flt) -> None:  # type: ignore[no-untyped-def]
    x, meta = _data()
    vectors.upsert([(f"v{i}", x[i], meta[i]) for i in range(len(x))])
    for q in x[:4]:
        got = [h.id for h in vectors.query(q, 10, filter=flt)]
        assert got == _brute(x, meta, q, 10, flt), flt


def test_upsert_replaces_fetch_and_deletes(vectors) -> None:  # type: ignore[no-untyped-def]
    x, meta = _data()
    vectors.upsert([(f"v{i}", x[i], meta[i]) for i in range(len(x))])
    vectors.upsert([("v1", x[9], {"subreddit": "new", "score": 1})])
    got = vectors.fetch(["v1", "v2", "nope"])
    assert set(got) == {"v1", "v2"} and got["v1"][1] == {"subreddit": "new", "score": 1}
    np.testing.assert_allclose(got["v1"][0], x[9], atol=1e-6)
    assert {h.id for h in vectors.query(x[9], 2)} == {"v1", "v9"}
    assert vectors.delete(ids=["v9"]) == 1
    assert [h.id for h in vectors.query(x[9], 1)] == ["v1"]
    n_memes = sum(m["subreddit"] == "memes" for i, m in enumerate(meta) if i not in (1, 9))
    assert vectors.delete(filter={"subreddit": "memes"}) == n_memes
    assert not vectors.query(x[0], 200, filter={"subreddit": "memes"})
    assert vectors.stats()["total_vector_count"] == len(x) - 1 - n_memes


def test_namespaces_are_separate(vectors) -> None:  # type: ignore[no-untyped-def]
    x, meta = _data(20)
    vectors.upsert([(f"v{i}", x[i], meta[i]) for i in range(10)], namespace="a")
    vectors.upsert([(f"v{i}", x[i], meta[i]) for i in range(10, 20)], namespace="b")
    assert {h.id for h in vectors.query(x[0], 20, namespace="a")} == {f"v{i}" for i in range(10)}
    assert vectors.query(x[0], 5, namespace="empty") == []
    assert vectors.stats()["namespaces"]["b"]["vector_count"] == 10


def test_pinecone_batches_requests(pinecone_standin) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stores.pinecone_store import PineconeVectorStore, batches

    store = PineconeVectorStore(pinecone_standin.api_key, host=pinecone_standin.host, timeout=5)
    pinecone_standin.data.clear()
    pinecone_standin.requests.clear()
    x, meta = _data(2500)
    store.upsert([(f"v{i}", x[i], meta[i]) for i in range(len(x))])
    assert sum(1 for r in pinecone_standin.requests if r[1] == "/vectors/upsert") == 3  # <= 1000 a request
    assert store.stats()["total_vector_count"] == 2500
    big = [{"id": str(i), "values": [0.1] * 768, "metadata": {"title": "x" * 20_000}} for i in range(200)]
    sizes = [len(b) for b in batches(big)]
    assert sum(sizes) == 200 and len(sizes) > 1  # split by size long before 1000 vectors


def test_pinecone_retries_then_gives_a_clear_error(pinecone_standin) -> None:  # type: ignore[no-untyped-def]
    from pipeline.stores.pinecone_store import PineconeVectorStore

    store = PineconeVectorStore(pinecone_standin.api_key, host=pinecone_standin.host, timeout=5, retries=3)
    pinecone_standin.data.clear()
    x, meta = _data(5)
    pinecone_standin.fail_next[:] = [429, 503]
    store.upsert([(f"v{i}", x[i], meta[i]) for i in range(5)])  # two failures, then success
    assert store.stats()["total_vector_count"] == 5
    pinecone_standin.fail_next[:] = [500] * 10
    with pytest.raises(Unavailable, match="pinecone"):
        store.query(x[0], 3)
    pinecone_standin.fail_next.clear()
    bad = PineconeVectorStore("wrong-key", host=pinecone_standin.host, timeout=5)
    with pytest.raises(Unavailable) as err:
        bad.query(x[0], 3)
    assert "wrong-key" not in str(err.value)  # secrets never reach messages


@pytest.fixture(params=["local", "gcs"])
def blobs(request, tmp_path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    if request.param == "local":
        yield LocalBlobStore(tmp_path)
    else:
        from pipeline.stores.gcs_blob import GcsBlobStore

        request.getfixturevalue("gcs_emulator")
        yield GcsBlobStore("imgsearch-test", prefix=f"t-{uuid.uuid4().hex[:8]}", timeout=5)


def test_blob_round_trip(blobs) -> None:  # type: ignore[no-untyped-def]
    key = "features/v1/post1"
    assert blobs.get(key) is None and not blobs.exists(key)
    payload = bytes(range(256)) * 4000  # ~1 MB, about one post's features
    blobs.put(key, payload)
    assert blobs.exists(key) and blobs.get(key) == payload
    blobs.put(key, b"second")
    assert blobs.get(key) == b"second"
    blobs.delete(key)
    assert blobs.get(key) is None and not blobs.exists(key)
    blobs.delete(key)  # deleting what is gone is fine
    for bad in ("../x", "/abs", ""):
        with pytest.raises(ImgSearchError):
            blobs.put(bad, b"x")


def test_blob_keys_under_a_folder(blobs) -> None:  # type: ignore[no-untyped-def]
    """What a takedown lists to find every thumbnail size of a post: the folder's keys, none of its neighbours'."""
    assert blobs.keys_under("thumbs/p1/") == []
    for key in ("thumbs/p1/128.jpg", "thumbs/p1/77.jpg", "thumbs/p10/128.jpg", "thumbs/p1.jpg"):
        blobs.put(key, b"x")
    assert sorted(blobs.keys_under("thumbs/p1/")) == ["thumbs/p1/128.jpg", "thumbs/p1/77.jpg"]
    with pytest.raises(ImgSearchError):
        blobs.keys_under("thumbs/p1")  # a folder ends in "/": a bare prefix would take p10's too


def test_gcs_timeout_is_a_clear_error(gcs_emulator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A server that accepts connections and never answers: the call ends at its timeout, as Unavailable."""
    from pipeline.stores.gcs_blob import GcsBlobStore

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sink.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sink.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{sink.getsockname()[1]}")
    try:
        store = GcsBlobStore("imgsearch-test", timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises((Unavailable, StoreError)):
            store.get("features/v1/x")
        assert time.monotonic() - t0 < 30
    finally:
        stop.set()
        sink.close()
        for c in held:
            c.close()

"""The embedded vector store: ANN answers against brute force, upsert/delete, filters, persistence."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from pipeline import filters
from pipeline.errors import InvalidRequest, StoreError
from pipeline.stores.local_vector import LocalVectorStore


def _data(n: int, d: int = 32, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    x = (centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = [{"subreddit": ["memes", "dankmemes", "me_irl"][i % 3], "score": int(i), "over_18": i % 7 == 0}
            for i in range(n)]
    return x, meta


def _brute(x: np.ndarray, meta: list[dict], q: np.ndarray, k: int, flt: dict | None = None) -> list[str]:
    ok = [i for i in range(len(x)) if filters.matches(flt, meta[i])]
    scores = x[ok] @ q
    return [f"p{ok[i]}" for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(params=["flat", "ivf"])
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[LocalVectorStore, np.ndarray, list[dict]]:
    """2000 vectors in each layout: the flat index, and inverted lists (it leaves flat above 500)."""
    x, meta = _data(2000)
    store = LocalVectorStore(tmp_path, exact_below=100, ivf_above=500 if request.param == "ivf" else 50_000)
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(len(x))])
    return store, x, meta


def test_query_matches_brute_force(filled) -> None:  # type: ignore[no-untyped-def]
    store, x, meta = filled
    recalls = []
    for q in x[:20]:
        got = [m.id for m in store.query(q, 10)]
        recalls.append(len(set(got) & set(_brute(x, meta, q, 10))) / 10)
    assert np.mean(recalls) >= 0.98
    top = store.query(x[5], 1)[0]
    assert top.id == "p5" and top.score == pytest.approx(1.0, abs=1e-5)
    assert top.metadata == meta[5]


@pytest.mark.parametrize("flt", [
    {"subreddit": "memes"},
    {"subreddit": {"$in": ["memes", "me_irl"]}, "over_18": False},
    {"$or": [{"score": {"$lt": 50}}, {"score": {"$gte": 1990}}]},
    {"$and": [{"score": {"$gt": 100}}, {"subreddit": {"$ne": "memes"}}, {"subreddit": {"$nin": ["me_irl"]}}]},
    {"score": {"$lte": 30}},
])
def test_filters_equal_brute_force(filled, flt) -> None:  # type: ignore[no-untyped-def]
    store, x, meta = filled
    for q in x[:5]:
        got = [m.id for m in store.query(q, 10, filter=flt)]
        want = _brute(x, meta, q, 10, flt)
        assert len(set(got) & set(want)) >= 9, (flt, got, want)
        assert all(filters.matches(flt, meta[int(g[1:])]) for g in got)


def test_upsert_replaces_and_delete_removes(filled) -> None:  # type: ignore[no-untyped-def]
    store, x, meta = filled
    store.upsert([("p1", x[7], {"subreddit": "new"})])
    hits = store.query(x[7], 2)
    assert {h.id for h in hits} == {"p1", "p7"}
    assert store.fetch(["p1"])["p1"][1] == {"subreddit": "new"}
    assert store.delete(ids=["p7", "missing"]) == 1
    assert [h.id for h in store.query(x[7], 1)] == ["p1"]
    removed = store.delete(filter={"subreddit": "dankmemes"})
    assert removed == sum(m["subreddit"] == "dankmemes" for i, m in enumerate(meta) if i not in (1, 7))
    assert not [h for h in store.query(x[1], 50) if h.metadata.get("subreddit") == "dankmemes"]
    assert store.stats()["total_vector_count"] == 2000 - 1 - removed


def test_namespaces_are_separate(tmp_path: Path) -> None:
    x, meta = _data(20)
    store = LocalVectorStore(tmp_path)
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(10)], namespace="a")
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(10, 20)], namespace="b")
    assert {h.id for h in store.query(x[0], 20, namespace="a")} == {f"p{i}" for i in range(10)}
    assert store.query(x[0], 5, namespace="c") == []


def test_bad_input(tmp_path: Path) -> None:
    store = LocalVectorStore(tmp_path)
    assert store.query(np.ones(4, np.float32), 5) == []  # empty store
    store.upsert([("a", np.ones(4, np.float32), {})])
    with pytest.raises(StoreError, match="re-ingest"):
        store.query(np.ones(8, np.float32), 5)
    with pytest.raises(StoreError, match="4-d"):
        store.upsert([("b", np.ones(8, np.float32), {})])
    with pytest.raises(InvalidRequest, match="unknown filter operator"):
        store.query(np.ones(4, np.float32), 5, filter={"score": {"$regex": "x"}})


def test_reopen_after_save_and_after_unsaved_writes(tmp_path: Path) -> None:
    x, meta = _data(300)
    store = LocalVectorStore(tmp_path)
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(200)])
    store.save()
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(200, 300)])  # never saved to a snapshot
    store.delete(ids=["p3"])
    store.close()
    again = LocalVectorStore(tmp_path)
    assert again.stats()["total_vector_count"] == 299
    assert again.query(x[250], 1)[0].id == "p250"
    assert "p3" not in {h.id for h in again.query(x[3], 10)}


def test_grows_from_flat_to_lists_and_retrains_on_save(tmp_path: Path) -> None:
    x, meta = _data(2000)
    store = LocalVectorStore(tmp_path, ivf_above=300)
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(200)])
    assert store._index("").nlist == 0  # exact while small
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(200, 400)])
    assert store._index("").nlist == 20  # about sqrt(400) lists, trained on the namespace
    store.upsert([(f"p{i}", x[i], meta[i]) for i in range(400, 2000)])
    assert store._index("").nlist == 20  # a writer retrains at save, not mid-stream
    store.save()
    assert store._index("").nlist == 45  # grown 4x past its training: retrained
    store.close()
    again = LocalVectorStore(tmp_path, ivf_above=300)
    assert again._index("").nlist == 45  # the snapshot holds the lists
    for i in (0, 399, 1999):
        assert again.query(x[i], 1)[0].id == f"p{i}"
    recalls = [len({m.id for m in again.query(q, 10)} & set(_brute(x, meta, q, 10))) / 10 for q in x[:20]]
    assert np.mean(recalls) >= 0.95


def _writer(root: str, n: int) -> None:
    x, meta = _data(n, seed=1)
    store = LocalVectorStore(root)
    for i in range(0, n, 50):
        store.upsert([(f"w{j}", x[j], meta[j]) for j in range(i, i + 50)])
        if i % 200 == 0:
            store.save()


def test_killed_writer_leaves_a_store_that_opens(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_writer, args=(str(tmp_path), 100_000))
    proc.start()
    try:
        # kill mid-write: once the first snapshot exists and more rows landed after it
        import sqlite3
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if list(tmp_path.glob("ns-*.faiss")):
                n = sqlite3.connect(tmp_path / "store.sqlite3").execute("SELECT count(*) FROM vectors").fetchone()[0]
                if n > 400:
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the writer never got going")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    store = LocalVectorStore(tmp_path)
    count = store.stats()["total_vector_count"]
    assert count >= 400 and count % 50 == 0  # whole upserts only
    x, _ = _data(100_000, seed=1)
    assert store.query(x[count - 1], 1)[0].id == f"w{count - 1}"


def test_columns_agree_with_the_python_evaluator() -> None:
    from pipeline.columns import Columns

    rng = np.random.default_rng(3)
    values = ["memes", "me_irl", 0, 1, 2.5, 1000, True, False, "", None]
    metas = []
    for _ in range(400):
        meta = {}
        for key in ("a", "b", "c"):
            v = values[rng.integers(len(values))]
            if v is not None:
                meta[key] = v
        metas.append(meta)
    cols = Columns()
    cols.append(list(range(10, 410)), metas)
    cols.kill([12, 13])
    flts = [{"a": "memes"}, {"a": 1}, {"a": True}, {"b": {"$ne": 0}}, {"c": {"$in": ["memes", 1, True]}},
            {"c": {"$nin": [False, 2.5]}}, {"a": {"$gt": 0.5}}, {"b": {"$lte": 1}, "c": {"$gte": 1}},
            {"$or": [{"a": "me_irl"}, {"b": {"$lt": 1}}]}, {"$and": [{"a": {"$ne": "memes"}}, {"zzz": {"$ne": 1}}]},
            {"zzz": 1}]
    for flt in flts:
        want = [i + 10 for i, m in enumerate(metas) if filters.matches(flt, m) and i + 10 not in (12, 13)]
        assert cols.select(flt).tolist() == want, flt


def test_a_repeated_filter_sees_every_write_in_between(tmp_path: Path) -> None:
    """The same filter on every query (search's NSFW default) keeps its bitmap only while nothing changed."""
    store = LocalVectorStore(tmp_path, exact_below=0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store.upsert([(f"v{i}", x[i], {"over_18": i % 10 == 0}) for i in range(300)])
    sfw = {"over_18": {"$ne": True}}
    q = x[7]
    before = store.query(q, 5, filter=sfw)
    assert before[0].id == "v7" and all(int(m.id[1:]) % 10 for m in before)
    store.upsert([("new", q, {"over_18": False})])  # a new row that the filter keeps
    assert store.query(q, 1, filter=sfw)[0].id in ("new", "v7")
    assert "new" in {m.id for m in store.query(q, 2, filter=sfw)}
    store.upsert([("new", q, {"over_18": True})])  # the same id, now kept out
    assert "new" not in {m.id for m in store.query(q, 5, filter=sfw)}
    store.delete(ids=["v7"])
    assert "v7" not in {m.id for m in store.query(q, 5, filter=sfw)}
    store.close()

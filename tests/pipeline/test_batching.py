"""Cross-query batching: several queries' model calls in one, each query's numbers as if it ran alone; a lone
query never waits for company; one bad item fails only itself."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline.search.batching import Active, Batcher

QUERIES = ["a red circle", "two small blue squares on a white background, drawn by hand", "😮", "a",
           "a yellow triangle on black"]


def test_batched_rerank_equals_each_query_alone(engines) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    probe = engines.reranker.vision_features([Image.new("RGB", (64, 64), "red")])[0]
    items = [(q, [rng.standard_normal(probe.shape).astype(np.float16) for _ in range(n)])
             for q, n in zip(QUERIES, (3, 40, 1, 0, 7), strict=True)]
    together = engines.reranker.score_many(items, pairs_per_call=16)
    for (q, feats), (itm, cos) in zip(items, together, strict=True):
        alone_itm, alone_cos = engines.reranker.score(q, feats)
        np.testing.assert_allclose(itm, alone_itm, atol=1e-5)
        np.testing.assert_allclose(cos, alone_cos, atol=1e-5)


def test_batched_text_encoding_equals_each_query_alone(engines) -> None:  # type: ignore[no-untyped-def]
    together = engines.text.encode_text(QUERIES)
    for q, row in zip(QUERIES, together, strict=True):
        np.testing.assert_allclose(row, engines.text.encode_text([q])[0], atol=1e-5)


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_answer() -> None:
    active = Active()
    release = threading.Event()

    def double(xs: list[int]) -> list[int]:
        release.wait(5)  # the first batch holds the model while the others queue up behind it
        return [2 * x for x in xs]

    b: Batcher[int, int] = Batcher("double", double, max_items=8, wait_s=0.5, active=active)

    def job(x: int) -> int:
        with active.job():
            return b(x)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(job, x) for x in range(8)]
        release.set()
        assert [f.result(10) for f in futures] == [2 * x for x in range(8)]
    assert sum(b.sizes) == 8 and max(b.sizes) > 1


def test_a_lone_query_does_not_wait_for_company() -> None:
    active = Active()
    b: Batcher[int, int] = Batcher("lone", lambda xs: list(xs), max_items=8, wait_s=30, active=active)
    t0 = time.monotonic()
    with active.job():
        assert b(7) == 7
    assert time.monotonic() - t0 < 5  # the 30 s window was not waited out: no other job was running


def test_one_bad_item_fails_only_itself() -> None:
    active = Active()
    hold = threading.Event()

    def check(xs: list[int]) -> list[int]:
        hold.wait(5)
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return list(xs)

    b: Batcher[int, int] = Batcher("check", check, max_items=8, wait_s=0.5, active=active)

    def job(x: int) -> int:
        with active.job():
            return b(x)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(job, x) for x in (1, -1, 2, 3)]
        hold.set()
        with pytest.raises(ValueError):
            futures[1].result(10)
        assert [futures[i].result(10) for i in (0, 2, 3)] == [1, 2, 3]


def test_close_answers_the_calls_handed_in_then_ends_the_thread_and_refuses_more() -> None:
    active = Active()
    release = threading.Event()

    def double(xs: list[int]) -> list[int]:
        release.wait(5)
        return [2 * x for x in xs]

    b: Batcher[int, int] = Batcher("close", double, max_items=2, wait_s=0.05, active=active)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(b, x) for x in range(4)]  # a batch runs (held), the rest wait behind it
        deadline = time.monotonic() + 5
        while b._q.qsize() < 2 and time.monotonic() < deadline:  # noqa: SLF001 - the calls are handed in
            time.sleep(0.01)
        closer = pool.submit(b.close, 10)
        release.set()
        closer.result(10)
        assert sorted(f.result(10) for f in futures) == [0, 2, 4, 6]  # put before the stop mark: all answered
    assert not b.running
    with pytest.raises(RuntimeError, match="closed"):
        b(1)
    b.close()  # twice: nothing left to stop

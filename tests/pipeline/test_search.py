"""The Searcher in-process on the tiny models, and a job's life in a real Redis."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.jobs.commands import parse_events
from pipeline.jobs.keys import events_key, job_key
from pipeline.jobs.runner import run_job
from pipeline.jobs.store import JobStore, connect
from pipeline.layout import feature_key
from pipeline.search.searcher import Searcher
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.types import Job, SearchParams
from tests.conftest import make_settings


def _searcher(data_dir: Path, tiny_models, engines, **kw) -> Searcher:  # type: ignore[no-untyped-def]
    s = make_settings(data_dir, tiny_models, **kw)
    return Searcher(s, engines.text, make_vector_store(s), make_blob_store(s), engines.reranker)


def test_search_ranks_by_fused_score(store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    searcher = _searcher(store_dir, tiny_models, engines)
    out = searcher.search(SearchParams(query="a red circle", limit=10))
    assert len(out.candidates) == 32 and len(out.results) == 10 and not out.not_reranked
    scores = [r.score for r in out.results]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1  # the tiny models do tell candidates apart
    for r in out.results:
        assert r.score == pytest.approx(0.7 * r.itm + 0.3 * r.cosine, abs=1e-6)
        assert r.metadata["title"] and r.metadata["subreddit"]
    # the ANN candidates come from SigLIP alone; fusion reorders them
    q = engines.text.encode_text(["a red circle"])[0]
    assert out.candidates[0].score == pytest.approx(max(c.score for c in out.candidates))
    best = out.candidates[0].id
    assert out.candidates[0].score == pytest.approx(float(searcher.vectors.fetch([best])[best][0] @ q), abs=1e-5)
    assert set(out.timings) == {"encode", "retrieve", "fetch", "rerank", "fuse"}


def test_search_scores_equal_the_full_blip_forward(store_dir, tiny_models, engines, demo_images) -> None:  # type: ignore[no-untyped-def]
    """Stored features reproduce what BLIP computes from pixels (ITM and cosine)."""
    import torch
    from PIL import Image

    out = _searcher(store_dir, tiny_models, engines).search(SearchParams(query="a green square", limit=3))
    m, blip = engines.reranker.model, engines.reranker
    for r in out.results:
        pixels = blip.pixels([Image.open(demo_images / f"{r.id}.png")])
        tok = blip.tokenizer(["a green square"], return_tensors="pt")
        with torch.inference_mode():
            itm = torch.softmax(m(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels,
                                  use_itm_head=True).itm_score, -1)[0, 1].item()
            cos = m(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels,
                    use_itm_head=False).itm_score[0, 0].item()
        # features are stored as float16 (the DESIGN's format), hence a small tolerance
        assert r.itm == pytest.approx(itm, abs=2e-3) and r.cosine == pytest.approx(cos, abs=2e-3)


def test_missing_or_corrupt_features_keep_ann_order(store_dir, tiny_models, engines, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    shutil.copytree(store_dir, data)
    searcher = _searcher(data, tiny_models, engines)
    first = searcher.search(SearchParams(query="a blue triangle"))
    a, b = first.candidates[0].id, first.candidates[1].id
    searcher.blobs.delete(feature_key(engines.reranker.version, a))
    searcher.blobs.put(feature_key(engines.reranker.version, b), b"IMGF-garbage")
    out = searcher.search(SearchParams(query="a blue triangle"))
    assert out.not_reranked == [a, b]
    tail = out.results[-2:]
    assert [r.id for r in tail] == [a, b] and tail[0].itm is None and tail[0].score == pytest.approx(tail[0].ann_score)


@pytest.mark.integration
def test_run_job_done_and_failed(redis_server, store_dir, tiny_models, engines, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    r = connect(redis_server.url(3), 5)
    r.flushdb()
    writer = JobStore(r, ttl=60, maxlen=64)
    job = Job(id="a" * 32, status="queued", query="a red circle", params={"limit": 5}, created_at=0.0)
    writer.write(job, ("queued", {}), create=True)
    done = run_job(job.id, _searcher(store_dir, tiny_models, engines), writer)
    assert done is not None and done.status == "done" and len(done.results or []) == 5
    names = [e[1] for e in parse_events(r.xrange(events_key(job.id)))]
    assert names == ["queued", "started", "candidates", "results", "done"]
    assert 0 < r.ttl(job_key(job.id)) <= 60 and 0 < r.ttl(events_key(job.id)) <= 60
    # a redelivered job that already ended is left alone
    assert run_job(job.id, _searcher(store_dir, tiny_models, engines), writer).status == "done"  # type: ignore[union-attr]
    assert len(r.xrange(events_key(job.id))) == 5

    # a stage that raises ends the job failed with a stable code and a safe message: here a store made by another
    # encoder. The store's path and the story go to the log, under the job's id, not into the public record.
    other = tmp_path / "other"
    s = make_settings(other, tiny_models)
    make_vector_store(s).upsert([("x", np.ones(7, np.float32) / 7 ** 0.5, {})])
    bad = Job(id="b" * 32, status="queued", query="anything", created_at=0.0)
    writer.write(bad, ("queued", {}), create=True)
    failed = run_job(bad.id, _searcher(other, tiny_models, engines), writer)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "dimension_mismatch" and failed.error.message
    assert str(other) not in failed.error.message and "StoreError" not in failed.error.message
    assert any(bad.id in rec.getMessage() and "re-ingest" in rec.getMessage() and str(other) in rec.getMessage()
               for rec in caplog.records)
    last = parse_events(r.xrange(events_key(bad.id)))[-1]
    assert last[1] == "failed" and last[2]["error"]["code"] == "dimension_mismatch"
    assert json.loads(r.get(job_key(bad.id)))["status"] == "failed"


@pytest.mark.integration
def test_job_past_its_deadline_fails(redis_server, store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    r = connect(redis_server.url(3), 5)
    writer = JobStore(r, ttl=60, maxlen=64)
    job = Job(id="c" * 32, status="queued", query="late", created_at=0.0, deadline_at=1.0)
    writer.write(job, ("queued", {}), create=True)
    out = run_job(job.id, _searcher(store_dir, tiny_models, engines), writer)
    assert out is not None and out.status == "failed" and out.error is not None
    assert out.error.code == "deadline_exceeded"


@pytest.mark.integration
def test_a_running_job_ends_cancelled_at_its_next_stage(redis_server, store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    from pipeline.jobs.keys import cancel_key

    r = connect(redis_server.url(2), 5)
    r.flushdb()
    writer = JobStore(r, ttl=60, maxlen=64)
    job = Job(id="c" * 32, status="running", query="a red circle", created_at=0.0)
    writer.write(job, create=True)
    r.set(cancel_key(job.id), b"1")  # what DELETE /v1/jobs/{id} leaves for a job a worker already holds
    out = run_job(job.id, _searcher(store_dir, tiny_models, engines), writer)
    assert out is not None and out.status == "failed" and out.error is not None and out.error.code == "cancelled"
    assert not out.results
    searcher = _searcher(store_dir, tiny_models, engines)
    assert searcher.search(SearchParams(query="x"), cancelled=lambda: False).results  # not cancelled: runs


@pytest.mark.integration
def test_of_two_ends_of_one_job_the_first_stands(redis_server, store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    """A job ended elsewhere (reaped, cancelled, or finished by the worker it was redelivered to) keeps that end:
    a second run writes neither results nor a second end, and leaves the open set as it was."""
    from pipeline.jobs.keys import OPEN_KEY
    from pipeline.jobs.store import reaped

    r = connect(redis_server.url(4), 5)
    r.flushdb()
    writer = JobStore(r, ttl=60, maxlen=64)
    job = Job(id="d" * 32, status="queued", query="a red circle", created_at=0.0, deadline_at=4e9)
    assert writer.write(job, ("queued", {}), create=True)
    assert not writer.write(job, ("queued", {}), create=True)  # one record per id
    assert r.zscore(OPEN_KEY, job.id) == 4e9
    assert writer.write(reaped(Job.model_validate_json(r.get(job_key(job.id)))), ("failed", {}))
    assert r.zscore(OPEN_KEY, job.id) is None
    out = run_job(job.id, _searcher(store_dir, tiny_models, engines), writer)
    assert out is not None and out.status == "failed" and out.error is not None
    assert out.error.code == "deadline_exceeded"
    assert [e[1] for e in parse_events(r.xrange(events_key(job.id)))] == ["queued", "failed"]

    # the other order: the run ends first; the late end is refused and the results stand
    other = Job(id="e" * 32, status="queued", query="a red circle", created_at=0.0, deadline_at=4e9)
    writer.write(other, ("queued", {}), create=True)
    assert run_job(other.id, _searcher(store_dir, tiny_models, engines), writer).status == "done"  # type: ignore[union-attr]
    assert not writer.write(reaped(other), ("failed", {}))
    stored = Job.model_validate_json(r.get(job_key(other.id)))
    assert stored.status == "done" and stored.results and r.zscore(OPEN_KEY, other.id) is None
    assert [e[1] for e in parse_events(r.xrange(events_key(other.id)))].count("done") == 1


@pytest.mark.integration
def test_image_jobs_end_like_text_ones(redis_server, store_dir, tiny_models, engines, demo_images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """like and picture jobs through run_job: done with cosine scores, a picture gone from Redis fails clearly,
    cancellation and deadlines hold, the fleet's counters carry the kind, and a liked post whose features are
    missing keeps the ANN order."""
    from pipeline import metrics
    from pipeline.jobs.keys import cancel_key, picture_key
    from pipeline.search.image_query import check

    r = connect(redis_server.url(2), 5)
    r.flushdb()
    writer = JobStore(r, ttl=60, maxlen=64)
    searcher = _searcher(store_dir, tiny_models, engines)
    searcher.image = engines.image
    picture = check((demo_images / "demo007.png").read_bytes(), searcher.settings)

    def run(job_id: str, params: dict, status: str = "queued", **kw) -> Job:  # type: ignore[no-untyped-def,type-arg]
        job = Job(id=job_id * 32, status=status, query="", params=params, created_at=0.0, **kw)
        writer.write(job, create=True)
        out = run_job(job.id, searcher, writer)
        assert out is not None
        return out

    r.set(picture_key("d" * 32), picture.jpeg)
    by_picture = run("d", {"image": picture.sha256, "limit": 5})
    assert by_picture.status == "done" and by_picture.results and by_picture.results[0].id == "demo007"
    assert all(x.itm is None and x.score == x.cosine for x in by_picture.results)
    assert r.exists(picture_key("d" * 32)) == 0  # dropped by the script that ended the job
    gone = run("e", {"image": picture.sha256})  # never kept (or expired)
    assert gone.status == "failed" and gone.error is not None and gone.error.code == "image_expired"
    liked = run("f", {"like": "demo007", "limit": 5})
    assert liked.status == "done" and "demo007" not in [x.id for x in liked.results or []]
    r.set(cancel_key("0" * 32), b"1")
    cancelled = run("0", {"like": "demo007"}, status="running")
    assert cancelled.error is not None and cancelled.error.code == "cancelled"
    late = run("1", {"like": "demo007"}, deadline_at=1.0)
    assert late.error is not None and late.error.code == "deadline_exceeded"
    jobs = {k: int(v) for k, v in r.hgetall(metrics.JOBS).items()}
    assert jobs == {"image:done": 1, "image:failed": 1, "like:done": 1, "like:failed": 2}
    assert int(r.hget(metrics.stage_key("encode", "like"), "count")) == 1

    data = tmp_path / "data"  # the liked post's own features are missing: nothing to compare, ANN order stands
    shutil.copytree(store_dir, data)
    bare = _searcher(data, tiny_models, engines)
    bare.blobs.delete(feature_key(engines.reranker.version, "demo007"))
    out = bare.search(SearchParams(query="", like="demo007", limit=5))
    assert out.not_reranked and [x.score for x in out.results] == [x.ann_score for x in out.results]


def test_each_kind_gets_its_plan_and_close_stops_the_searchers_threads(store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    import threading

    from pipeline.search.plans import ImagePlan, LikePlan, TextPlan, plan_for

    assert isinstance(plan_for(SearchParams(query="x")), TextPlan)
    assert isinstance(plan_for(SearchParams(query="", like="demo007")), LikePlan)
    assert isinstance(plan_for(SearchParams(query="", image="ab" * 32)), ImagePlan)

    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(("batch-", "store_", "fetch_"))}

    before = ours()  # other tests' Searchers, never closed
    searcher = _searcher(store_dir, tiny_models, engines, batch_max=4)
    assert searcher.search(SearchParams(query="a red circle", limit=3)).results  # every pool has run once
    names = {t.name.split("_")[0] for t in ours() - before}
    assert names == {"batch-encode", "batch-rerank", "store", "fetch"}, names
    searcher.close()
    deadline = time.monotonic() + 10
    while ours() - before and time.monotonic() < deadline:  # pool threads end once they see the shutdown
        time.sleep(0.02)
    assert ours() - before == set()
    with pytest.raises(RuntimeError):
        searcher.search(SearchParams(query="a red circle", limit=3))

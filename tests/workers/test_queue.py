"""End to end through real processes: the API (uvicorn) enqueues on a real redis-server, a real Celery worker
with preloaded engines runs the job. No eager mode anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from pipeline.search.searcher import Searcher
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.types import SearchParams
from tests.conftest import make_settings, settings_env
from tests.live import Live, start_stack

pytestmark = pytest.mark.integration
QUERIES = ["a red circle", "a blue square on a white background", "a yellow triangle on a black background"]


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    env = settings_env(store_dir, tiny_models, redis_server.url(5))
    running = start_stack(env, tmp_path_factory.mktemp("logs"))
    yield running
    running.stop()


def assert_matches_in_process(live: Live, store_dir: Path, tiny_models, engines, atol: float) -> list[dict]:  # type: ignore[no-untyped-def]
    """Each query's job through the queue ranks as the same pipeline run in this process on the default stores."""
    s = make_settings(store_dir, tiny_models)
    searcher = Searcher(s, engines.text, make_vector_store(s), make_blob_store(s), engines.reranker)
    jobs = []
    for q in QUERIES:
        job = live.wait(live.submit(q, limit=10))
        assert job["status"] == "done", job
        want = searcher.search(SearchParams(query=q, limit=10)).results
        assert [r["id"] for r in job["results"]] == [r.id for r in want]
        np.testing.assert_allclose([r["score"] for r in job["results"]], [r.score for r in want], atol=atol)
        jobs.append(job)
    return jobs


def test_results_equal_the_same_pipeline_in_process(live, store_dir, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    for job in assert_matches_in_process(live, store_dir, tiny_models, engines, atol=1e-5):
        first = job["results"][0]
        assert set(first) >= {"id", "score", "itm", "cosine", "metadata"}
        assert first["metadata"]["title"] and first["metadata"]["width"] == 96
        assert set(job["timings"]) >= {"encode", "retrieve", "fetch", "rerank", "fuse", "total", "queue_wait"}


def _read_sse(resp: httpx.Response) -> list[tuple[str, dict]]:
    events, name, data = [], None, None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and name is not None:
            events.append((name, data))
            name, data = None, None
    return events


def test_sse_delivers_events_in_order_then_closes(live) -> None:  # type: ignore[no-untyped-def]
    job_id = live.submit("a green circle", limit=5)
    with httpx.stream("GET", f"{live.base}/v1/jobs/{job_id}/events", timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(resp)  # returns only because the server closed the stream
    assert [e[0] for e in events] == ["queued", "started", "candidates", "results", "done"]
    candidates = [c["id"] for c in events[2][1]["candidates"]]
    results = [r["id"] for r in events[3][1]["results"]]
    assert len(candidates) == 32 and len(results) == 5 and set(results) <= set(candidates)
    # the ANN order comes first; the final ranking is the job's
    assert results == [r["id"] for r in live.wait(job_id)["results"]]
    # a client that connects after the end still reads the whole history
    with httpx.stream("GET", f"{live.base}/v1/jobs/{job_id}/events", timeout=30) as resp:
        assert [e[0] for e in _read_sse(resp)] == ["queued", "started", "candidates", "results", "done"]


def test_blocking_search_agrees_with_polling(live) -> None:  # type: ignore[no-untyped-def]
    for q in QUERIES:
        legacy = httpx.post(f"{live.base}/search", json={"query": q}, timeout=60)
        assert legacy.status_code == 200, legacy.text
        pairs = legacy.json()["results"]
        assert set(legacy.json()) == {"results"} and all(len(p) == 2 for p in pairs)
        polled = live.wait(live.submit(q))["results"]
        assert [p[0] for p in pairs] == [r["id"] for r in polled]
        np.testing.assert_allclose([p[1] for p in pairs], [r["score"] for r in polled], atol=1e-6)


def test_readyz_reports_the_worker_and_its_engines(live) -> None:  # type: ignore[no-untyped-def]
    body = httpx.get(f"{live.base}/readyz", timeout=5).json()
    assert body["ready"] is True and body["redis"] == "ok"
    (w,) = body["workers"]
    assert w["engines_loaded"] is True and w["backend"] == "torch" and w["siglip"].startswith("siglip-")


def test_a_failing_stage_ends_the_job_failed(live) -> None:  # type: ignore[no-untyped-def]
    # a filter naming an operator the store can't run is refused at the door...
    r = httpx.post(f"{live.base}/v1/jobs", json={"query": "x", "filter": {"a": {"$near": 1}}}, timeout=10)
    assert r.status_code == 422
    # ...and one that passes validation but matches nothing ends done with no results, not failed
    job = live.wait(live.submit("a red circle", filter={"subreddit": "no-such-sub"}))
    assert job["status"] == "done" and job["results"] == []


@pytest.mark.parity
def test_worker_runs_on_onnxruntime_by_one_setting(redis_server, store_dir, tiny_models, engines, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.export import build_onnx

    engine_dir = tmp_path / "engines"
    build_onnx(str(tiny_models.siglip), str(tiny_models.blip), engine_dir)
    env = settings_env(store_dir, tiny_models, redis_server.url(7), IMGSEARCH_ENGINE_BACKEND="onnxruntime",
                       IMGSEARCH_ENGINE_DIR=str(engine_dir))
    redis.Redis.from_url(redis_server.url(7)).flushdb()
    running = start_stack(env, tmp_path / "logs")
    try:
        (w,) = httpx.get(f"{running.base}/readyz", timeout=5).json()["workers"]
        assert w["backend"] == "onnxruntime" and w["precision"] == "fp32"
        assert_matches_in_process(running, store_dir, tiny_models, engines, atol=1e-4)
    finally:
        running.stop()


def test_worker_refuses_to_start_without_its_engine(store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = settings_env(store_dir, tiny_models, "redis://127.0.0.1:1/0", IMGSEARCH_ENGINE_BACKEND="onnxruntime",
                       IMGSEARCH_ENGINE_PRECISION="int8", IMGSEARCH_ENGINE_DIR=str(tmp_path / "none"))
    out = subprocess.run([sys.executable, "-m", "cli.main", "worker"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "imgsearch engines build --backend onnxruntime --precision int8" in out.stderr


@pytest.mark.contract
def test_query_path_unchanged_on_pinecone_and_gcs(redis_server, pinecone_standin, gcs_emulator, demo_images,  # type: ignore[no-untyped-def]
                                                  tiny_models, engines, store_dir, tmp_path) -> None:
    """VECTOR_STORE=pinecone and BLOB_STORE=gcs (the stand-in and the emulator): same answers as the defaults."""
    from pipeline.ingest import ingest_folder

    pinecone_standin.data.clear()
    pinecone_standin.fail_next.clear()
    remote = {"VECTOR_STORE": "pinecone", "PINECONE_API_KEY": pinecone_standin.api_key,
              "IMGSEARCH_PINECONE_HOST": pinecone_standin.host, "BLOB_STORE": "gcs",
              "IMGSEARCH_GCS_BUCKET": "imgsearch-test", "IMGSEARCH_GCS_PREFIX": "e2e",
              "STORAGE_EMULATOR_HOST": gcs_emulator.host}
    s = make_settings(tmp_path / "data", tiny_models, vector_store="pinecone", blob_store="gcs",
                      pinecone_api_key=pinecone_standin.api_key, pinecone_host=pinecone_standin.host,
                      gcs_bucket="imgsearch-test", gcs_prefix="e2e", ingest_dedup="off")
    report = ingest_folder(s, demo_images, engines.image, engines.reranker, make_vector_store(s), make_blob_store(s))
    assert report.ingested == 48 and make_vector_store(s).stats()["total_vector_count"] == 48
    env = settings_env(tmp_path / "data", tiny_models, redis_server.url(10), **remote)
    redis.Redis.from_url(redis_server.url(10)).flushdb()
    running = start_stack(env, tmp_path / "logs")
    try:
        for job in assert_matches_in_process(running, store_dir, tiny_models, engines, atol=1e-4):
            assert job["results"][0]["metadata"]["title"]
    finally:
        running.stop()

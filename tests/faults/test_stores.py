"""A slow or failing vector store and blob store, through a real worker: the real ``pinecone`` client against
the stand-in and the real ``google-cloud-storage`` client against the GCS emulator, each behind a proxy that
delays, answers 503 or resets. Every job ends within its deadline, with the outcome that fits the fault:

- vector store down: the job fails ``vector_store_unavailable``; after ``breaker_failures`` such failures the
  circuit opens and jobs fail at once; it closes again once the store answers;
- vector store slower than the deadline: the job fails ``deadline_exceeded`` at its deadline;
- blob store slow or down: the job is done in ANN order, flagged ``degraded``; with its circuit open the
  fetch is skipped outright.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from cli import stack
from standins.faults import FaultProxy
from tests.conftest import make_settings, settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.contract]

DEADLINE_S = 4.0
RESET_S = 3.0


@dataclass
class Faulty:
    live: Live
    pinecone: FaultProxy
    gcs: FaultProxy

    def run(self, query: str, **params: Any) -> tuple[dict[str, Any], float]:
        """One job to its end: (the job, seconds from submit to its end as the worker recorded it)."""
        job = self.live.wait(self.live.submit(query, **params), timeout=30)
        took = job["finished_at"] - job["created_at"]
        vec, blob = self.pinecone.mode, self.gcs.mode
        print(f"stores: vector store {vec}, blob store {blob}: {job['status']} "
              f"{(job.get('error') or {}).get('code', 'degraded' if job.get('degraded') else 'whole')} in {took:.2f} s")
        return job, took

    def breakers(self) -> dict[str, str]:
        (worker,) = httpx.get(f"{self.live.base}/readyz", timeout=5).json()["workers"]
        return dict(worker.get("breakers") or {})

    def wait_breaker(self, name: str, state: str) -> None:
        """The worker's heartbeat (every 2/3 s here) reports the circuit in that state."""
        stack.wait_for(lambda: self.breakers().get(name) == state, 5, f"the {name} circuit {state}", interval=0.1)


@pytest.fixture(scope="module")
def faulty(redis_server, pinecone_standin, gcs_emulator, demo_images, tiny_models, engines,  # type: ignore[no-untyped-def]
           tmp_path_factory) -> Iterator[Faulty]:
    from pipeline.ingest import ingest_folder
    from pipeline.stores import make_blob_store, make_vector_store

    data = tmp_path_factory.mktemp("faulty")
    s = make_settings(data, tiny_models, vector_store="pinecone", blob_store="gcs", namespace="faults",
                      pinecone_api_key=pinecone_standin.api_key, pinecone_host=pinecone_standin.host,
                      gcs_bucket="imgsearch-test", gcs_prefix="faults", ingest_dedup="off")
    # written straight to the stand-in and the emulator (the fixture points the client at it), not through faults
    report = ingest_folder(s, demo_images, engines.image, engines.reranker, make_vector_store(s), make_blob_store(s))
    assert report.ingested == 48
    pinecone_standin.fail_next.clear()
    pinecone_standin.delay_s = 0
    pc = FaultProxy("127.0.0.1", int(pinecone_standin.host.rsplit(":", 1)[1]))
    gcs = FaultProxy("127.0.0.1", int(gcs_emulator.host.rsplit(":", 1)[1]))
    env = settings_env(
        data, tiny_models, redis_server.url(12),
        VECTOR_STORE="pinecone", PINECONE_API_KEY=pinecone_standin.api_key, IMGSEARCH_PINECONE_HOST=pc.url,
        BLOB_STORE="gcs", IMGSEARCH_GCS_BUCKET="imgsearch-test", IMGSEARCH_GCS_PREFIX="faults",
        STORAGE_EMULATOR_HOST=gcs.url, IMGSEARCH_NAMESPACE="faults",
        IMGSEARCH_STORE_TIMEOUT_S="1", IMGSEARCH_STORE_RETRIES="1", IMGSEARCH_FETCH_TIMEOUT_S="1",
        IMGSEARCH_BREAKER_FAILURES="3", IMGSEARCH_BREAKER_RESET_S=str(RESET_S),
        IMGSEARCH_JOB_DEADLINE_S=str(DEADLINE_S), IMGSEARCH_REAPER_GRACE_S="1", IMGSEARCH_REAPER_INTERVAL_S="0.5",
        IMGSEARCH_HEARTBEAT_TTL_S="2",  # the circuits' states reach /readyz within a second
        # nothing cached: every job meets the stores
        IMGSEARCH_CACHE_RESULTS_TTL_S="0", IMGSEARCH_CACHE_LOCAL_MB="0", IMGSEARCH_CACHE_FEATURES="off")
    redis.Redis.from_url(redis_server.url(12)).flushdb()
    live = start_stack(env, tmp_path_factory.mktemp("faulty-logs"))
    yield Faulty(live, pc, gcs)
    live.stop()
    pc.close()
    gcs.close()


def _recovered(f: Faulty) -> dict[str, Any]:
    """Both proxies passing, and a job done in full once the circuits closed again."""
    f.pinecone.set("pass")
    f.gcs.set("pass")
    out: dict[str, Any] = {}

    def whole() -> bool:
        job, _ = f.run("a red circle")
        out.update(job)
        return job["status"] == "done" and not job.get("degraded")

    stack.wait_for(whole, 4 * RESET_S + 10, "a job done in full after the faults", interval=0.2)
    f.wait_breaker("vector_store", "closed")
    f.wait_breaker("blob_store", "closed")
    return out


def test_vector_store_failing_then_slow(faulty: Faulty) -> None:
    base = _recovered(faulty)
    assert base["results"] and not base.get("not_reranked")

    # 503s, then resets: each job fails with the store named, quickly; the third failure opens the circuit
    outcomes = []
    for mode in ("status", "reset", "status"):
        faulty.pinecone.set(mode)  # type: ignore[arg-type]
        job, took = faulty.run("a red circle")
        outcomes.append((job["status"], job["error"]["code"]))
        assert took < DEADLINE_S
    assert outcomes == [("failed", "vector_store_unavailable")] * 3
    job, took = faulty.run("a red circle")
    assert job["error"]["code"] == "vector_store_unavailable" and "circuit open" in job["error"]["message"]
    assert took < 0.5  # refused without calling the store
    faulty.wait_breaker("vector_store", "open")
    # the blocking route says 503, as it does for any dependency that is down
    resp = httpx.post(f"{faulty.live.base}/search", json={"query": "a red circle"}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "vector_store_unavailable"
    _recovered(faulty)

    # slower than the job's deadline: the job ends at its deadline, not when the store answers
    faulty.pinecone.set("delay", delay_s=15)
    job, took = faulty.run("a red circle", deadline_s=2)
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
    assert 1.5 < took < 2.5
    _recovered(faulty)


def test_blob_store_slow_or_failing_gives_ann_order_flagged_degraded(faulty: Faulty) -> None:
    base = _recovered(faulty)
    ann_order = sorted(base["results"], key=lambda r: -r["ann_score"])
    for mode, delay in (("delay", 5.0), ("status", 0.0), ("reset", 0.0)):
        _recovered(faulty)
        faulty.gcs.set(mode, delay_s=delay)  # type: ignore[arg-type]
        job, took = faulty.run("a red circle")
        assert job["status"] == "done" and job["degraded"] is True, (mode, job)
        assert took < DEADLINE_S and job["timings"]["fetch"] < 1000 * 1.5  # fetch_timeout_s bounds it
        assert [r["id"] for r in job["results"]] == [r["id"] for r in ann_order]
        assert all(r["score"] == r["ann_score"] and "itm" not in r for r in job["results"])
        assert set(job["not_reranked"]) == {r["id"] for r in base["results"]}
    # the failures above opened the blob store's circuit: the fetch is skipped outright, the job still done
    faulty.gcs.set("delay", delay_s=5.0)
    for _ in range(3):
        faulty.run("a red circle")
    job, took = faulty.run("a red circle")
    # skipped, not waited for: a fetch that asks the store waits fetch_timeout_s (1 s) here
    assert job["status"] == "done" and job["degraded"] is True and job["timings"]["fetch"] < 200
    assert job["stats"].get("features_blob", 0) == 0
    faulty.wait_breaker("blob_store", "open")
    again = _recovered(faulty)
    assert [r["id"] for r in again["results"]] == [r["id"] for r in base["results"]]

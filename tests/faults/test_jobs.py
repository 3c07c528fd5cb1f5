"""Deadlines per request, cancellation, and backpressure: every accepted job ends, and a full queue says so
at once. Against a real Redis, and a real worker where one must run (or skip) the jobs."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from cli import stack
from pipeline.jobs.commands import parse_events
from pipeline.jobs.keys import events_key
from pipeline.jobs.store import connect
from pipeline.settings import Settings
from tests.conftest import settings_env

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def _client(redis_server: Any, db: int, **kw: Any) -> TestClient:
    redis.Redis.from_url(redis_server.url(db)).flushdb()
    return TestClient(create_app(Settings(redis_url=redis_server.url(db), limits={"rate_limit_per_min": 0}, **kw)))


def _events(redis_server: Any, db: int, job_id: str) -> list[str]:
    r = connect(redis_server.url(db), 5)
    return [name for _, name, _ in parse_events(r.xrange(events_key(job_id)))]


def test_a_request_sets_its_own_deadline_within_the_cap(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 1, job_deadline_s=30) as c:
        for asked, got in ((5, 5), (500, 30), (None, 30)):
            body = {"query": "x"} if asked is None else {"query": "x", "deadline_s": asked}
            job = c.get(c.post("/v1/jobs", json=body).json()["links"]["self"]).json()
            assert job["deadline_at"] - job["created_at"] == pytest.approx(got, abs=0.01)
            assert "deadline_s" not in job["params"]
        for bad in (0, 0.5, 1e-200):  # under a second: no job could keep it
            assert c.post("/v1/jobs", json={"query": "x", "deadline_s": bad}).status_code == 422


def test_a_full_queue_answers_503_at_once(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 2, max_queue_length=3) as c:
        assert [c.post("/v1/jobs", json={"query": f"q{i}"}).status_code for i in range(3)] == [202] * 3
        t0 = time.monotonic()
        resp = c.post("/v1/jobs", json={"query": "one too many"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "queue_full"
        assert resp.headers["retry-after"] and time.monotonic() - t0 < 1


def test_cancel_a_queued_job(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 3) as c:
        url = c.post("/v1/jobs", json={"query": "x"}).json()["links"]["self"]
        resp = c.delete(url)
        assert resp.status_code == 202
        assert resp.json()["status"] == "failed" and resp.json()["error"]["code"] == "cancelled"
        assert c.get(url).json()["error"]["code"] == "cancelled"
        assert _events(redis_server, 3, url.rsplit("/", 1)[1]) == ["queued", "failed"]
        assert c.delete(url).status_code == 409
        assert c.delete("/v1/jobs/" + "0" * 32).status_code == 404


def test_a_worker_skips_cancelled_jobs_and_fails_expired_ones(redis_server, store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = 4
    with _client(redis_server, db) as c:
        cancelled = c.post("/v1/jobs", json={"query": "x"}).json()["id"]
        c.delete(f"/v1/jobs/{cancelled}")
        expired = c.post("/v1/jobs", json={"query": "x", "deadline_s": 1}).json()["id"]
        fine = c.post("/v1/jobs", json={"query": "a red circle"}).json()["id"]
        deadline = c.get(f"/v1/jobs/{expired}").json()["deadline_at"]
        stack.wait_for(lambda: time.time() > deadline, 5, "the short deadline to pass", interval=0.05)
        worker = stack.start_worker(settings_env(store_dir, tiny_models, redis_server.url(db)), tmp_path / "w.log")
        try:
            stack.wait_for(lambda: c.get(f"/v1/jobs/{fine}").json()["status"] == "done", 120, "the fine job")
            stack.wait_for(lambda: c.get(f"/v1/jobs/{expired}").json()["status"] == "failed", 30, "the expired job")
        finally:
            worker.stop()
        assert c.get(f"/v1/jobs/{expired}").json()["error"]["code"] == "deadline_exceeded"
        assert "started" not in _events(redis_server, db, cancelled)
        assert c.get(f"/v1/jobs/{cancelled}").json()["error"]["code"] == "cancelled"


@pytest.mark.parametrize(("code", "status"), [("deadline_exceeded", 504), ("cancelled", 409), ("search_failed", 500)])
def test_the_blocking_route_answers_a_failed_job_with_its_own_status(redis_server, code, status) -> None:  # type: ignore[no-untyped-def]
    """POST /search waits on the job's events: what the worker wrote decides the status (the fuzzing pass
    once met a 500 for an expired job)."""
    import threading

    from pipeline.jobs.keys import job_key
    from pipeline.jobs.store import JobStore
    from pipeline.types import ErrorInfo, Job

    db = 5
    r = connect(redis_server.url(db), 5)
    with _client(redis_server, db) as c:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(resp=c.post("/search", json={"query": "x"})))
        t.start()
        keys: list[bytes] = []

        def queued() -> bool:
            keys[:] = [k for k in r.scan_iter(match=job_key("*")) if not k.endswith(":events")]
            return bool(keys)

        stack.wait_for(queued, 10, "the job record")
        job = Job.model_validate_json(r.get(keys[0]) or "{}")
        job.status, job.error = "failed", ErrorInfo(code=code, message=f"it {code}")
        JobStore(r, 60, 64).write(job, ("failed", {"id": job.id}))  # what a worker writes when the job ends so
        t.join(30)
    resp = out["resp"]
    assert resp.status_code == status and resp.json()["error"] == {"code": code, "message": f"it {code}"}


def test_the_reaper_ends_a_job_no_worker_will(redis_server) -> None:  # type: ignore[no-untyped-def]
    """No worker at all: the job still ends, failed with deadline_exceeded, soon after its deadline."""
    from pipeline.jobs.keys import OPEN_KEY

    db = 6
    with _client(redis_server, db, reaper_interval_s=0.1, reaper_grace_s=0.5) as c:
        reaped_before = _reaped(c.get("/metrics").text)  # the counter is the process's: earlier tests' apps count
        url = c.post("/v1/jobs", json={"query": "x", "deadline_s": 1}).json()["links"]["self"]
        job = c.get(url).json()
        assert job["status"] == "queued"
        stack.wait_for(lambda: c.get(url).json()["status"] == "failed", 10, "the reaper")
        ended = c.get(url).json()
        assert ended["error"]["code"] == "deadline_exceeded"
        assert job["deadline_at"] + 0.5 <= ended["finished_at"] <= job["deadline_at"] + 2
        assert _events(redis_server, db, job["id"]) == ["queued", "failed"]
        assert redis.Redis.from_url(redis_server.url(db)).zcard(OPEN_KEY) == 0
        assert _reaped(c.get("/metrics").text) == reaped_before + 1


def _reaped(metrics_text: str) -> float:
    line = next((ln for ln in metrics_text.splitlines() if ln.startswith("imgsearch_jobs_reaped_total ")), None)
    return float(line.split()[1]) if line else 0.0


def test_stranded_jobs_are_sent_again_before_their_deadline(redis_server) -> None:  # type: ignore[no-untyped-def]
    """A queued job whose message is gone from an empty queue (lost with a Redis restart), and a running job
    whose worker's heartbeat expired (the worker died): each is sent again once it stayed so rescue_after_s,
    at most rescue_max times; jobs merely waiting in the queue are not. The rescue rounds run here by hand at
    chosen times (no background loop), so nothing depends on timing."""
    import json

    from pipeline.jobs.keys import job_key
    from pipeline.jobs.store import JobStore
    from pipeline.types import Job

    db = 7
    r = connect(redis_server.url(db), 5)
    with _client(redis_server, db, reaper_interval_s=0, rescue_after_s=5, rescue_max=2) as c:
        def rescue(at: float) -> list[str]:
            return sorted(c.portal.call(c.app.state.recovery.rescue, at))  # type: ignore[union-attr]

        def queued_ids() -> list[str]:
            return sorted(json.loads(m)["headers"]["id"] for m in r.lrange("search", 0, -1))

        lost = c.post("/v1/jobs", json={"query": "lost"}).json()["id"]
        waiting = c.post("/v1/jobs", json={"query": "waiting"}).json()["id"]
        t = time.time()
        assert rescue(t) == [] and rescue(t + 10) == []  # in the queue: waiting, not stranded
        r.delete("search")  # both messages lost
        assert rescue(t + 11) == []  # stranded since now...
        assert rescue(t + 17) == sorted([lost, waiting]) == queued_ids()  # ...and still so 6 s later: sent again
        job = Job.model_validate_json(r.get(job_key(lost)) or "{}")
        job.status, job.worker = "running", "gone-host:4242"  # started on a worker that then died
        JobStore(r, 60, 64).write(job, ("started", {"id": job.id}))
        r.delete("search")
        assert rescue(t + 18) == [] and rescue(t + 24) == sorted([lost, waiting])
        r.delete("search")
        assert rescue(t + 30) == [] and rescue(t + 40) == [] and queued_ids() == []  # rescue_max reached

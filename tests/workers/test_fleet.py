"""The worker fleet as an operator sees it, on one stack of three workers (two threads each) whose vector store
(the Pinecone stand-in) answers slowly while a test wants jobs in hand:

- the queue depth an autoscaler reads: waiting plus reserved, while the queue's list is all but empty;
- a rolling restart under steady load: each worker sent SIGTERM in turn (as a deploy does) once its
  replacement is up; every accepted job ends, once, done; none is lost (none left to the reaper's deadline).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import httpx
import pytest
import redis

from cli import stack
from pipeline.jobs import queues
from pipeline.jobs.keys import events_key
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = pytest.mark.integration
DB = 20  # redis-server runs with 64 databases (cli/stack.py); 20 and up are issue 20's
GRACE_S = 2.0
WORKERS, THREADS = 3, 2


def test_kombu_keys_are_the_transports() -> None:
    """pipeline.jobs.queues names kombu's keys by name (pipeline imports no Celery): they must be the broker transport's."""
    from workers.broker import Channel

    assert queues.UNACKED_KEY == Channel.unacked_key
    assert queues.PRIORITY_SEP == Channel.sep
    assert list(queues.PRIORITY_STEPS) == list(Channel.priority_steps)


@pytest.fixture(scope="module")
def three(redis_server, pinecone_standin, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    env = settings_env(store_dir, tiny_models, redis_server.url(DB), IMGSEARCH_VECTOR_STORE="pinecone",
                       IMGSEARCH_PINECONE_API_KEY=pinecone_standin.api_key,
                       IMGSEARCH_PINECONE_HOST=pinecone_standin.host, IMGSEARCH_NAMESPACE="fleet",
                       IMGSEARCH_WORKER_CONCURRENCY=str(THREADS), IMGSEARCH_WORKER_SOFT_SHUTDOWN_S=str(GRACE_S),
                       IMGSEARCH_STORE_TIMEOUT_S="30", IMGSEARCH_STORE_RETRIES="0",
                       IMGSEARCH_CACHE_RESULTS_TTL_S="0", IMGSEARCH_WARM_UP="false", IMGSEARCH_JOB_DEADLINE_S="60")
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    live = start_stack(env, tmp_path_factory.mktemp("fleet-logs"), workers=WORKERS)
    yield live
    pinecone_standin.delay_s = 0
    live.stop()


def _gauges(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {f"{m[1]}:{m[2]}": float(m[3]) for m in
            re.finditer(r'^imgsearch_queue_(depth|reserved|backlog)\{queue="(\w+)"\} (\S+)$', text, re.M)}


def test_backlog_counts_reserved_jobs_the_list_misses(three: Live, redis_server, pinecone_standin) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(three.env["IMGSEARCH_REDIS_URL"])
    slots = WORKERS * THREADS
    pinecone_standin.delay_s = 6  # every query now holds its worker thread
    try:
        jobs = [three.submit(f"a red circle {i}", limit=3) for i in range(slots + 2)]
        # one job per worker thread runs (reserved), two wait
        stack.wait_for(lambda: _gauges(three.base).get("reserved:search") == slots, 15, "every thread's job reserved")
        g = _gauges(three.base)
        waiting = sum(r.llen(k) for k in queues.waiting_lists("search"))
        assert waiting == 2 and g["depth:search"] == 2
        assert g["backlog:search"] == slots + 2  # what KEDA's list scaler would read as 2
        assert g["backlog:embed"] == 0 and g["reserved:ingest"] == 0
    finally:
        pinecone_standin.delay_s = 0
    for job_id in jobs:
        assert three.wait(job_id, timeout=60)["status"] == "done"
    stack.wait_for(lambda: _gauges(three.base).get("backlog:search") == 0, 15, "the backlog to drain")


def test_three_workers_restarted_in_turn_under_load_lose_nothing(three: Live, redis_server,  # type: ignore[no-untyped-def]
                                                                 pinecone_standin) -> None:
    url = three.env["IMGSEARCH_REDIS_URL"]
    r = redis.Redis.from_url(url)
    pinecone_standin.delay_s = 0.4  # each query holds its worker thread a while
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:  # steady: about five jobs a second
        while not stop.is_set():
            accepted.append(three.submit("a red circle", limit=3))
            stop.wait(0.2)

    client = threading.Thread(target=load, daemon=True)
    client.start()
    try:
        workers = [p for p in three.procs if p.name.startswith("w")]
        for i, old in enumerate(workers):  # one at a time, a replacement first (a deploy's surge of one)
            stack.wait_for(lambda want=5 * (i + 1): len(accepted) >= want, 30, "load before the restart")  # type: ignore[misc]
            three.procs.append(stack.start_worker(three.env, three.logs / f"worker{i}-new.log", name=f"n{i}"))
            stack.wait_for(lambda: stack.live_workers(url) == WORKERS + 1, 90, "the replacement worker")
            old.stop(timeout=GRACE_S + 20)  # SIGTERM, then the soft shutdown's grace; SIGKILL only past it
            assert old.popen.returncode is not None
            three.procs.remove(old)
    finally:
        stop.set()
        client.join(10)
    jobs = {job_id: three.wait(job_id, timeout=90) for job_id in accepted}
    done = [j for j, job in jobs.items() if job["status"] == "done"]
    failed = [j for j, job in jobs.items() if job["status"] == "failed"]
    ends = {j: [f[b"event"] for _, f in r.xrange(events_key(j))].count(b"done") +
            [f[b"event"] for _, f in r.xrange(events_key(j))].count(b"failed") for j in accepted}
    lost = [j for j in accepted if j not in done and j not in failed] + \
        [j for j in failed if jobs[j].get("error", {}).get("code") == "deadline_exceeded"]  # the reaper's: stranded
    print(f"rolling restart of 3 workers: accepted {len(accepted)}, done {len(done)}, failed {len(failed)}, "
          f"lost {len(lost)}")
    assert len(accepted) >= 15
    assert lost == [] and failed == [] and len(done) == len(accepted)
    assert set(ends.values()) == {1}  # no job ended twice

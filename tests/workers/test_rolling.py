"""A rolling restart under steady load: three workers, each sent SIGTERM in turn (as a deploy does) and replaced
once it exited, while a client keeps submitting searches whose vector store answers slowly (jobs are in hand at
every signal). Every accepted job ends, once, done; none is lost (none left to the reaper's deadline)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from cli import stack
from pipeline.jobs.keys import events_key
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = pytest.mark.integration
DB = 22
GRACE_S = 3.0


@pytest.fixture(scope="module")
def rolling(redis_server, pinecone_standin, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    env = settings_env(store_dir, tiny_models, redis_server.url(DB), IMGSEARCH_VECTOR_STORE="pinecone",
                       IMGSEARCH_PINECONE_API_KEY=pinecone_standin.api_key,
                       IMGSEARCH_PINECONE_HOST=pinecone_standin.host, IMGSEARCH_NAMESPACE="rolling",
                       IMGSEARCH_WORKER_CONCURRENCY="2", IMGSEARCH_WORKER_SOFT_SHUTDOWN_S=str(GRACE_S),
                       IMGSEARCH_CACHE_RESULTS_TTL_S="0", IMGSEARCH_WARM_UP="false", IMGSEARCH_JOB_DEADLINE_S="60")
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    live = start_stack(env, tmp_path_factory.mktemp("rolling-logs"), workers=3)
    yield live
    pinecone_standin.delay_s = 0
    live.stop()


def test_three_workers_restarted_in_turn_under_load_lose_nothing(rolling: Live, redis_server,  # type: ignore[no-untyped-def]
                                                                 pinecone_standin) -> None:
    url = rolling.env["IMGSEARCH_REDIS_URL"]
    r = redis.Redis.from_url(url)
    pinecone_standin.delay_s = 0.4  # each query holds its worker thread a while
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:  # steady: about five jobs a second
        while not stop.is_set():
            accepted.append(rolling.submit("a red circle", limit=3))
            stop.wait(0.2)

    client = threading.Thread(target=load, daemon=True)
    client.start()
    try:
        workers = [p for p in rolling.procs if p.name.startswith("w")]
        for i, old in enumerate(workers):
            stack.wait_for(lambda: len(accepted) >= 5 * (i + 1), 30, "load before the restart")
            old.stop(timeout=GRACE_S + 20)  # SIGTERM, then the soft shutdown's grace; SIGKILL only past it
            assert old.popen.returncode is not None
            rolling.procs.remove(old)
            rolling.procs.append(stack.start_worker(rolling.env, rolling.logs / f"worker{i}-new.log", name=f"w{i}new"))
            stack.wait_for(lambda: stack.live_workers(url) == 3, 90, "the replacement worker")
    finally:
        stop.set()
        client.join(10)
    jobs = {job_id: rolling.wait(job_id, timeout=90) for job_id in accepted}
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

"""The queue depth an autoscaler reads: waiting plus reserved. A real worker holds jobs (its vector store
answers slowly, through a fault proxy) and /metrics counts them while the queue's list is all but empty."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import redis

from cli import stack
from pipeline.jobs import fleet
from standins.faults import FaultProxy
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = pytest.mark.integration
DB = 20  # redis-server runs with 64 databases (cli/stack.py); 20 and up are issue 20's


def test_kombu_keys_are_the_transports() -> None:
    """fleet reads kombu's keys by name (pipeline imports no Celery): they must be the broker transport's."""
    from workers.broker import Channel

    assert fleet.UNACKED_KEY == Channel.unacked_key
    assert fleet.PRIORITY_SEP == Channel.sep
    assert list(fleet.PRIORITY_STEPS) == list(Channel.priority_steps)


@pytest.fixture(scope="module")
def held(redis_server, pinecone_standin, store_dir, tiny_models, tmp_path_factory) -> Iterator[tuple[Live, FaultProxy]]:  # type: ignore[no-untyped-def]
    proxy = FaultProxy("127.0.0.1", int(pinecone_standin.host.rsplit(":", 1)[1]))
    env = settings_env(store_dir, tiny_models, redis_server.url(DB), VECTOR_STORE="pinecone",
                       PINECONE_API_KEY=pinecone_standin.api_key, IMGSEARCH_PINECONE_HOST=proxy.url,
                       IMGSEARCH_NAMESPACE="depth", IMGSEARCH_WORKER_CONCURRENCY="3",
                       IMGSEARCH_STORE_TIMEOUT_S="30", IMGSEARCH_STORE_RETRIES="0",
                       IMGSEARCH_CACHE_RESULTS_TTL_S="0")
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    live = start_stack(env, tmp_path_factory.mktemp("depth-logs"))
    yield live, proxy
    proxy.set("pass")
    live.stop()
    proxy.close()


def _gauges(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {f"{m[1]}:{m[2]}": float(m[3]) for m in
            re.finditer(r'^imgsearch_queue_(depth|reserved|backlog)\{queue="(\w+)"\} (\S+)$', text, re.M)}


def test_backlog_counts_reserved_jobs_the_list_misses(held, redis_server) -> None:  # type: ignore[no-untyped-def]
    live, proxy = held
    r = redis.Redis.from_url(redis_server.url(DB))
    proxy.set("delay", delay_s=8)  # every query now holds its worker thread
    jobs = [live.submit(f"a red circle {i}", limit=3) for i in range(5)]
    try:
        # three run (one per worker thread), two wait
        stack.wait_for(lambda: _gauges(live.base).get("reserved:search") == 3, 15, "three reserved jobs")
        g = _gauges(live.base)
        waiting = sum(r.llen(k) for k in fleet.priority_lists("search"))
        assert waiting == 2 and g["depth:search"] == 2
        assert g["backlog:search"] == 5  # what KEDA's list scaler would read as 2
        assert g["backlog:embed"] == 0 and g["reserved:ingest"] == 0
    finally:
        proxy.set("pass")
    for job_id in jobs:
        assert live.wait(job_id, timeout=60)["status"] in ("done", "failed")
    stack.wait_for(lambda: _gauges(live.base).get("backlog:search") == 0, 15, "the backlog to drain")

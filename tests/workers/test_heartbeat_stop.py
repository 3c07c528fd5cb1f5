"""A worker that stops cleanly takes its heartbeat with it, so /readyz never lists it (a long TTL here: only the
worker's own removal can make the key go before the test ends). Its heartbeat, while it runs, says what `auto`
chose and why (the threads worker runs the default, `auto`)."""

from __future__ import annotations

import pytest
import redis

from cli import stack
from pipeline.jobs import fleet
from pipeline.jobs.store import connect
from tests.conftest import settings_env

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_stopped_cleanly_leaves_no_heartbeat(pool, redis_server, store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url(11)
    redis.Redis.from_url(url).flushdb()
    env = settings_env(store_dir, tiny_models, url, IMGSEARCH_HEARTBEAT_TTL_S="600", IMGSEARCH_WARM_UP="false",
                       IMGSEARCH_ENGINE_DIR=str(tmp_path / "engines"))
    if pool == "threads":
        env.update(IMGSEARCH_ENGINE_BACKEND="auto", IMGSEARCH_ENGINE_PRECISION="auto")
    worker = stack.start_worker(env, tmp_path / "worker.log", pool=pool, concurrency=1)
    try:
        stack.wait_for(lambda: stack.live_workers(url) == 1 or not worker.alive(), 120, "the worker's heartbeat",
                       interval=0.1)
        assert worker.alive(), (tmp_path / "worker.log").read_text()[-2000:]
        (beat,) = fleet.read(connect(url, 2))
        if pool == "threads":
            assert beat["backend"] == "torch" and beat["precision"] in ("bf16", "fp32") and beat["auto"], beat
        else:
            assert (beat["backend"], beat["precision"]) == ("torch", "fp32") and "auto" not in beat
    finally:
        worker.stop(timeout=30)  # SIGTERM: the cold shutdown a deploy starts
    assert worker.popen.returncode is not None
    assert stack.live_workers(url) == 0, (tmp_path / "worker.log").read_text()[-3000:]

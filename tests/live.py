"""A running stack for end-to-end tests: real Celery workers and the API (uvicorn) over a real Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli import stack


@dataclass
class Live:
    base: str
    env: dict[str, str]
    logs: Path
    procs: list[stack.Proc] = field(default_factory=list)

    def submit(self, query: str, **params: object) -> str:
        r = httpx.post(f"{self.base}/v1/jobs", json={"query": query, **params}, timeout=10)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        job: dict = {}

        def ended() -> bool:
            nonlocal job
            job = httpx.get(f"{self.base}/v1/jobs/{job_id}", timeout=10).json()
            return job["status"] in ("done", "failed")

        stack.wait_for(ended, timeout, f"job {job_id}", interval=0.02)
        return job

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def start_stack(env: dict[str, str], logs: Path, workers: int = 1) -> Live:
    logs.mkdir(parents=True, exist_ok=True)
    port = stack.free_port()
    live = Live(f"http://127.0.0.1:{port}", env, logs)
    try:
        for i in range(workers):
            live.procs.append(stack.start_worker(env, logs / f"worker{i}.log", name=f"w{i}"))
        live.procs.append(stack.start_api(env, port, logs / "api.log"))
        stack.wait_for(lambda: stack.api_ready(live.base), 120, "the API to report a ready worker", interval=0.1)
    except BaseException:
        live.stop()
        raise
    return live




def demo_stack(redis_server, store_dir: Path, models, db: int, logs: Path):  # type: ignore[no-untyped-def]
    """A stack over the demo store and ``models`` on an emptied Redis database ``db``, stopped after the with
    block's tests (a module fixture's body)."""
    import redis

    from tests.conftest import settings_env

    env = settings_env(store_dir, models, redis_server.url(db))
    redis.Redis.from_url(redis_server.url(db)).flushdb()
    running = start_stack(env, logs)
    yield running
    running.stop()

"""A soak: 64 concurrent clients for two minutes (SOAK_S=300 for five) against the whole stack with the tiny
models, most through the blocking ``POST /search``, some submitting and polling. No 5xx, no job lost, the
worker's memory flat (RSS growth under 5% from the end of the first minute), and Redis's key count bounded
(job records expire)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from pipeline.jobs.keys import OPEN_KEY
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

CLIENTS = 64
SOAK_S = float(os.environ.get("SOAK_S", "120"))  # make test keeps CI short; the memory check starts at 24 s
JOB_TTL_S = 20
WORDS = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "on", "a", "white", "black", "background",
         "small", "large", "two", "shapes"]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: int = 0
    done: int = 0
    unfinished: list[str] = field(default_factory=list)  # accepted, but not seen ending
    finished_at: list[float] = field(default_factory=list)


async def _client(base: str, k: int, until: float, tally: Tally) -> None:
    rnd = random.Random(k)
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        i = 0
        while time.monotonic() < until:
            # a few hundred distinct queries: some repeat (the result cache answers them), most do not
            query = " ".join(rnd.choice(WORDS) for _ in range(4)) + f" {rnd.randrange(50)}"
            if i % 4:
                resp = await c.post("/search", json={"query": query, "limit": 10})
                tally.statuses[resp.status_code] += 1
                if resp.status_code == 200:
                    tally.accepted += 1
                    tally.done += 1
                    tally.finished_at.append(time.monotonic())
            else:
                resp = await c.post("/v1/jobs", json={"query": query, "limit": 10})
                tally.statuses[resp.status_code] += 1
                if resp.status_code == 202:
                    tally.accepted += 1
                    url = resp.json()["links"]["self"]
                    end = time.monotonic() + 60
                    while time.monotonic() < end:
                        job = (await c.get(url)).json()
                        if job["status"] in ("done", "failed"):
                            tally.done += job["status"] == "done"
                            tally.finished_at.append(time.monotonic())
                            break
                        await asyncio.sleep(0.05)
                    else:
                        tally.unfinished.append(url)
            i += 1


@pytest.mark.timeout(SOAK_S + 180)
def test_64_clients_for_soak_s_seconds(redis_server, store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = 15
    r = redis.Redis.from_url(redis_server.url(db))
    r.flushdb()
    env = settings_env(store_dir, tiny_models, redis_server.url(db), IMGSEARCH_JOB_TTL_S=str(JOB_TTL_S),
                       IMGSEARCH_CACHE_RESULTS_TTL_S=str(JOB_TTL_S))
    live: Live = start_stack(env, tmp_path / "logs")
    tally = Tally()
    samples: list[tuple[float, int, int]] = []  # (seconds in, worker RSS kB, Redis keys)
    try:
        (worker,) = httpx.get(f"{live.base}/readyz", timeout=5).json()["workers"]
        pid = int(worker["pid"])  # the process that runs the jobs
        t0 = time.monotonic()

        async def soak() -> None:
            until = t0 + SOAK_S
            clients = [asyncio.create_task(_client(live.base, k, until, tally)) for k in range(CLIENTS)]
            while time.monotonic() < until:
                samples.append((time.monotonic() - t0, _rss_kb(pid), r.dbsize()))
                await asyncio.sleep(min(5.0, SOAK_S / 20))
            await asyncio.gather(*clients)

        asyncio.run(soak())
        elapsed = time.monotonic() - t0
        final_keys = r.dbsize()
        kinds = Counter(":".join(k.decode().split(":")[:2]) + (":events" if k.endswith(b":events") else "")
                        for k in r.scan_iter(count=1000))
        open_jobs = r.zcard(OPEN_KEY)
    finally:
        live.stop()
    warm = [s for s in samples if s[0] >= min(60.0, SOAK_S / 5)]
    growth = (samples[-1][1] - warm[0][1]) / warm[0][1]
    peak_keys = max(s[2] for s in warm)
    recent = sum(t > t0 + elapsed - 2 * JOB_TTL_S for t in tally.finished_at)
    print(f"soak: {CLIENTS} clients, {elapsed:.0f} s, {tally.accepted} jobs accepted, {tally.done} done, "
          f"{len(tally.unfinished)} unfinished, statuses {dict(tally.statuses)}, {tally.accepted / elapsed:.1f} jobs/s; "
          f"worker RSS {warm[0][1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f} MB ({growth:+.2%}); "
          f"Redis keys peak {peak_keys}, final {final_keys} {dict(kinds.most_common(6))}")
    assert not [s for s in tally.statuses if s >= 500], tally.statuses
    assert set(tally.statuses) <= {200, 202}, tally.statuses  # nothing refused either: no limit was reached
    assert tally.accepted > CLIENTS and tally.done == tally.accepted and not tally.unfinished and open_jobs == 0
    assert growth < 0.05
    # keys expire with their jobs: what is left is about what the last two TTLs made, not all the jobs
    assert final_keys <= 4 * recent + 200 and final_keys < tally.accepted

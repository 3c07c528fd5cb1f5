"""The Redis primary lost under load: a primary, one replica and three Sentinels (Debian's redis-server, on free
ports), a real Celery worker and the API on the Sentinel URL, 8 clients submitting. The primary is SIGKILLed (and
restarted as a replica once the Sentinels promoted the other), or frozen with SIGSTOP past the failover and then
resumed, coming back with writes the new primary never saw. Every job the API answered 202 for must end once.

FAULTS_LOAD_S sets the load's length (default 60 s; shorter while developing)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from cli import stack
from pipeline import redisconn
from pipeline.jobs.commands import parse_events, parse_job
from pipeline.jobs.keys import TERMINAL, events_key, job_key
from tests.conftest import settings_env
from tests.live import Live, start_stack
from tests.redis_ha import RedisGroup

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]
CLIENTS = 8
LOAD_S = float(os.environ.get("FAULTS_LOAD_S", "60"))
DOWN_AFTER_MS = 2000
REFUSALS = {"unavailable", "not_replicated", "queue_full"}  # the 503s a failover may answer


@dataclass
class Answer:
    sent: float
    took: float
    status: int  # -1: no answer at all; -503: a 503 without the error shape or Retry-After
    job_id: str | None = None
    code: str | None = None


@dataclass
class Load:
    """CLIENTS clients submitting jobs in a loop, each answer recorded."""

    base: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _one(self, client: httpx.Client, n: int) -> Answer:
        t0 = time.time()
        try:
            resp = client.post(f"{self.base}/v1/jobs", json={"query": f"a blue square {n}"})
        except httpx.HTTPError:
            return Answer(t0, time.time() - t0, -1)
        if resp.status_code == 202:
            return Answer(t0, time.time() - t0, 202, resp.json()["id"])
        try:
            code = resp.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        ok = resp.status_code == 503 and code in REFUSALS and resp.headers.get("retry-after", "").isdigit()
        return Answer(t0, time.time() - t0, 503 if ok else -resp.status_code, code=code)

    def _run(self, me: int) -> None:
        with httpx.Client(timeout=20) as client:
            n = 0
            while not self.stop.is_set():
                self.answers.append(self._one(client, me * 1_000_000 + n))
                n += 1
                self.stop.wait(0.05)  # about 100 submissions a second in all: what one worker keeps up with

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def accepted(self, after: float = 0.0) -> list[Answer]:
        return [a for a in list(self.answers) if a.status == 202 and a.sent > after]


@pytest.fixture
def ha(tmp_path) -> Iterator[RedisGroup]:  # type: ignore[no-untyped-def]
    group = RedisGroup(tmp_path / "redis", down_after_ms=DOWN_AFTER_MS).start(replicas=1)
    yield group
    group.stop()


@pytest.fixture
def live(ha: RedisGroup, store_dir, tiny_models, tmp_path) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    env = settings_env(store_dir, tiny_models, ha.url(0), IMGSEARCH_REDIS_SOCKET_TIMEOUT_S="1",
                       IMGSEARCH_JOB_DEADLINE_S="45", IMGSEARCH_REAPER_INTERVAL_S="1", IMGSEARCH_RESCUE_AFTER_S="3",
                       IMGSEARCH_HEARTBEAT_TTL_S="10", IMGSEARCH_CACHE_RESULTS_TTL_S="0",
                       IMGSEARCH_REPLICA_ACKS="1", IMGSEARCH_REPLICA_WAIT_MS="50")
    running = start_stack(env, tmp_path / "logs")
    yield running
    running.stop()


def _ends(ha: RedisGroup, ids: list[str]) -> dict[str, str]:
    """Each accepted job's end as its record on the primary now says it: done, failed:<code>, or lost (no
    record, or still open long past its deadline and the reaper's grace)."""
    r = redisconn.connect(ha.url(0), 5)
    out: dict[str, str] = {}
    open_ = list(ids)
    deadline = time.monotonic() + 120
    while open_ and time.monotonic() < deadline:
        still = []
        for i in range(0, len(open_), 500):
            batch = open_[i:i + 500]
            for job_id, raw in zip(batch, r.mget([job_key(j) for j in batch]), strict=True):
                job = parse_job(raw)
                if job is None:
                    out[job_id] = "lost"
                elif job.status in TERMINAL:
                    out[job_id] = "done" if job.status == "done" else f"failed:{job.error.code if job.error else '?'}"
                else:
                    still.append(job_id)
        open_ = still
        time.sleep(0.2 if open_ else 0)
    return {**out, **{j: "lost" for j in open_}}


def _ended_twice(ha: RedisGroup, ids: list[str]) -> list[str]:
    """Jobs whose event stream (on the primary now) holds more than one end, or more than one set of results."""
    r = redisconn.connect(ha.url(0), 5)
    twice = []
    for job_id in ids:
        names = [n for _, n, _ in parse_events(r.xrange(events_key(job_id)))]
        if sum(n in TERMINAL for n in names) != 1 or names.count("results") > 1:
            twice.append(job_id)
    return twice


def _drive(ha: RedisGroup, live: Live, fault: str) -> dict[str, Any]:
    """Load for LOAD_S with the fault a third of the way in; then every answer and every accepted job's end."""
    load = Load(live.base).start()
    try:
        stack.wait_for(lambda: len(load.accepted()) >= 20, 60, "jobs accepted before the fault")
        time.sleep(max(0.0, LOAD_S / 3 - (time.time() - load.answers[0].sent)))  # the load's shape, not a wait
        old = ha.primary()
        assert old is not None
        hit = time.time()
        ha.kill(old) if fault == "kill" else ha.freeze(old)
        new = ha.wait_promoted(old, 30)
        promoted = time.time() - hit
        if fault == "kill":
            ha.start_node(replica_of=new, port=old)  # the old primary back, empty, as the new one's replica
        else:
            ha.thaw(old)  # back with what it took in last, as a primary, until the Sentinels demote it
            assert ha.role(old) == "master"  # two primaries for a while: the split the WAITs are for
        stack.wait_for(lambda: ha.role(old) == "slave", 60, "the old primary to rejoin as a replica")
        ha.wait_replicas(new, 1, 60)
        stack.wait_for(lambda: len(load.accepted(hit)) >= 20, 60, "jobs accepted after the failover")
        time.sleep(max(0.0, LOAD_S - (time.time() - load.answers[0].sent)))
    finally:
        load.finish()
    stack.wait_for(lambda: stack.api_ready(live.base), 30, "/readyz ready again")
    accepted = [a.job_id for a in load.accepted() if a.job_id]
    ends = _ends(ha, accepted)
    after = [a for a in load.accepted(hit)]
    return {"answers": load.answers, "hit": hit, "promoted": promoted, "ends": ends,
            "twice": _ended_twice(ha, accepted),
            "back": min(a.sent + a.took for a in after) - hit, "worker_alive": live.procs[0].alive()}


def _check(fault: str, got: dict[str, Any], back_within_s: float) -> None:
    answers: list[Answer] = got["answers"]
    ends: dict[str, str] = got["ends"]
    statuses = [a.status for a in answers]
    refused = [a for a in answers if a.status == 503]
    lost = [j for j, s in ends.items() if s == "lost"]
    failed = sorted(s for s in ends.values() if s.startswith("failed"))
    codes = sorted({a.code for a in refused if a.code})
    slowest = max(answers, key=lambda a: a.took)
    print(f"failover ({fault}): {len(answers)} submissions, {len(ends)} accepted, {len(refused)} refused with 503 "
          f"({', '.join(codes) or 'none'}), promoted after {got['promoted']:.1f} s, first new 202 "
          f"{got['back']:.2f} s after the fault, slowest answer {slowest.took:.2f} s ({slowest.status} "
          f"{slowest.code or ''}, sent {slowest.sent - got['hit']:+.1f} s from the fault); done "
          f"{list(ends.values()).count('done')}, failed {len(failed)} {failed[:5]}, lost {len(lost)}, "
          f"ended twice {len(got['twice'])}")
    assert set(statuses) <= {202, 503}, sorted(set(statuses))  # never a 500, a malformed 503 or no answer
    assert not lost, lost
    assert not got["twice"], got["twice"]
    assert got["back"] < back_within_s, f"the first new 202 came {got['back']:.1f} s after the fault"
    assert got["worker_alive"]  # the worker paused and resumed; nobody restarted it
    assert slowest.took < 15


def test_the_primary_sigkilled_under_load_loses_no_accepted_job(ha: RedisGroup, live: Live) -> None:
    _check("kill", _drive(ha, live, "kill"), back_within_s=10)


def test_the_primary_frozen_past_a_failover_loses_and_duplicates_nothing(ha: RedisGroup, live: Live) -> None:
    """SIGSTOP: the Sentinels promote the replica; resumed, the old primary still believes it is the primary,
    with writes in its buffers that the new one never saw, until the Sentinels demote it. Sentinel leaves a
    returning old primary alone for a fixed 8 s (4 of its 2 s publish periods) before making it a replica, and
    with one replica no job is acknowledged until one is back: service returns about 12 s after the freeze
    here, not within the SIGKILL test's 10 s (where the old primary comes back as a replica at once)."""
    _check("freeze", _drive(ha, live, "freeze"), back_within_s=25)

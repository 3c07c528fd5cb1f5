"""The command layer of a job's life: each command's KEYS, ARGV and answer without Redis, then both executors
against a real one (the same commands through the sync and the async face give the same state), and the one
policy: ``run`` raises Unavailable when Redis is away, ``attempt`` answers its fallback."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis.asyncio as aioredis

from pipeline.errors import Unavailable
from pipeline.jobs import commands as c
from pipeline.jobs.keys import OPEN_KEY, WORKERS_KEY, heartbeat_key, inflight_key, job_key
from pipeline.jobs.queues import UNACKED_KEY, waiting_lists
from pipeline.jobs.store import connect
from pipeline.types import Job

DB = 40


def _job(status: str = "queued", **kw: object) -> Job:
    now = time.time()
    return Job(id=uuid.uuid4().hex, status=status, query="q", created_at=now, deadline_at=now + 60, **kw)  # type: ignore[arg-type]


# --- without Redis ---------------------------------------------------------------------------------------------

def test_limit_and_creation_build_keys_and_argv_by_field() -> None:
    limit = c.Limit("b", "k", burst=5, rate=0.5, cost=0.1, cap=3, member="m", until=9.5, now=1.25)
    assert limit.keys() == ["b", "k"]
    assert limit.argv() == [5, 0.5, 0.1, 3, "1.25", "m", "9.5"]
    job = _job()
    write = c.Write(job, 60, 64, (("queued", {"id": job.id}),), create=True)
    assert write.keys() == [job_key(job.id), f"{job_key(job.id)}:events", OPEN_KEY, f"{job_key(job.id)}:image"]
    assert write.argv()[1:] == [60, 64, "1", job.id, repr(job.deadline_at), "queued", json.dumps({"id": job.id})
                                .replace(" ", "")]
    assert json.loads(write.argv()[0])["status"] == "queued"
    create = c.Create(write, "search", 7)
    assert create.keys() == write.keys() + list(waiting_lists("search")) and create.argv() == [7] + write.argv()
    both = c.AdmitCreate(limit, create)
    assert both.keys()[:2] == ["b", "k"] and both.argv()[:7] == limit.argv()
    # the Lua reads the limit's ARGV as the first _LIMIT_ARGC values, then the queue cap, then the write's
    assert len(limit.argv()) == c._LIMIT_ARGC and both.argv()[c._LIMIT_ARGC] == 7
    assert c.Limit("b", "k", 1, 0).read(["rate_limited", "2.5"]) == c.Verdict("rate_limited", 2.5)
    assert c.Verdict("ok").ok and not c.Verdict("queue_full", 3).ok


def test_an_ended_job_leaves_the_open_set_and_names_no_deadline() -> None:
    done = _job("done")
    assert c.Write(done, 60, 64).argv()[5] == ""  # no deadline: the script drops it from the open set instead


def test_reads_and_walks_build_their_commands() -> None:
    assert c.Load("x").argv() == ["GET", job_key("x")] and c.Load("x").read(None) is None
    job = _job()
    assert c.Load(job.id).read(job.model_dump_json()).id == job.id  # type: ignore[union-attr]
    assert c.Picture("x").read(b"\xff\xd8") == b"\xff\xd8" and c.Picture("x").read(None) is None
    assert c.ReadEvents("x", "0", 10).argv() == ["XREAD", "COUNT", 10, "STREAMS", f"{job_key('x')}:events", "0"]
    assert c.ReadEvents("x", "1-0", 10, 1000).argv()[3:5] == ["BLOCK", 1000]
    assert c.ReadEvents("x", "0", 1).read([["k", [("1-0", {"event": "queued", "data": '{"id":"x"}'})]]]) == \
        [("1-0", "queued", {"id": "x"})]
    assert c.ReadEvents("x", "0", 1).read([]) == []
    assert c.Stranded("search", 5.0).keys() == [OPEN_KEY, *waiting_lists("search")]
    assert c.Stranded("search", 5.0).argv() == ["5.0", 2000, job_key(""), heartbeat_key("")]
    assert c.Overdue(3.0).argv() == ["3.0", 500, job_key("")]
    assert c.RemoveBeats(("a", "b")).keys() == [WORKERS_KEY, heartbeat_key("a"), heartbeat_key("b")]
    assert c.ReadBeats().read(["a", '{"pid": 1}']) == {"a": {"pid": 1}}
    depths = c.QueueDepths(("search", "embed"))
    assert depths.keys() == [UNACKED_KEY, *waiting_lists("search"), *waiting_lists("embed")]
    assert depths.read([2, 5, 0, 1]) == {"search": (2, 5), "embed": (0, 1)}


# --- against a real Redis --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_jobs_life_through_the_sync_executor(redis_server) -> None:  # type: ignore[no-untyped-def]
    r = connect(redis_server.url(DB), 5)
    r.flushdb()
    x = c.SyncExecutor(r)
    job = _job(inflight_key=inflight_key("ip:a"))
    limit = c.Limit("b", inflight_key("ip:a"), burst=2, rate=1.0, cap=1, member=job.id, until=job.deadline_at or 0)
    create = c.Create(c.Write(job, 60, 64, (("queued", {"id": job.id}),), create=True), "search", 10)
    assert x.run(c.AdmitCreate(limit, create)).ok
    assert r.zscore(OPEN_KEY, job.id) == job.deadline_at
    second = _job()
    again = c.Limit("b", inflight_key("ip:a"), burst=2, rate=1.0, cap=1, member=second.id, until=time.time() + 60)
    assert x.run(c.AdmitCreate(again, c.Create(c.Write(second, 60, 64, create=True), "search", 10))) == \
        c.Verdict("too_many_jobs", 1)  # the cap: nothing of the second job was written
    assert not r.exists(job_key(second.id))
    assert x.run(c.Event(job.id, "started", {"id": job.id}, 64, 60))
    job.status = "done"
    assert x.run(c.Write(job, 60, 64, (("done", {"id": job.id}),)))
    assert not x.run(c.Write(job, 60, 64, (("done", {"id": job.id}),)))  # the first end wins
    assert not x.run(c.Event(job.id, "late", {}, 64, 60))
    assert [e[1] for e in x.run(c.ReadEvents(job.id, "0", 10))] == ["queued", "started", "done"]
    assert r.zscore(OPEN_KEY, job.id) is None
    assert x.run(c.Release(inflight_key("ip:a"), job.id)) and not r.exists(inflight_key("ip:a"))
    r.script_flush()  # a new primary after a failover has no script cached: the executor loads it again
    assert x.run(c.Load(job.id)).status == "done"  # type: ignore[union-attr]
    assert x.run(c.Write(_job(), 60, 64, create=True))


@pytest.mark.integration
def test_walks_find_stranded_overdue_and_depths(redis_server) -> None:  # type: ignore[no-untyped-def]
    r = connect(redis_server.url(DB), 5)
    r.flushdb()
    x = c.SyncExecutor(r)
    queued, running, alive = _job(), _job("running", worker="gone:1"), _job("running", worker="here:2")
    for job in (queued, running, alive):
        assert x.run(c.Write(job, 60, 64, create=True))
    x.run(c.WriteBeat("here:2", {"host": "here", "pid": 2}, 30))
    assert sorted(x.run(c.Stranded("search", time.time()))) == sorted([queued.id, running.id])
    r.rpush("search", "m")  # a message waits: a queued job is not stranded
    assert x.run(c.Stranded("search", time.time())) == [running.id]
    assert x.run(c.QueueDepths(("search", "embed"))) == {"search": (1, 0), "embed": (0, 0)}
    late = time.time() + 120
    ended = _job("done")
    r.zadd(OPEN_KEY, {ended.id: 1.0})  # an ended job that did not leave the open set, and a record that expired
    r.zadd(OPEN_KEY, {"expired": 1.0})
    x.run(c.Write(ended, 60, 64, create=True))
    overdue = x.run(c.Overdue(late))
    assert sorted(j.id for j in overdue) == sorted([queued.id, running.id, alive.id])
    assert r.zscore(OPEN_KEY, "expired") is None and r.zscore(OPEN_KEY, ended.id) is None
    assert x.run(c.Resent(queued.id, 60)) == 1 and x.run(c.Resent(queued.id, 60)) == 2
    assert list(x.run(c.ReadBeats())) == ["here:2"]
    assert x.run(c.RemoveBeats(("here:2",))) == 1 and x.run(c.ReadBeats()) == {}
    assert not r.sismember(WORKERS_KEY, "here:2")


@pytest.mark.integration
def test_the_async_executor_runs_the_same_commands(redis_server) -> None:  # type: ignore[no-untyped-def]
    connect(redis_server.url(DB), 5).flushdb()

    async def life() -> tuple[Job | None, list[str], bytes | None]:
        client = aioredis.Redis.from_url(redis_server.url(DB), decode_responses=True)
        x = c.AsyncExecutor(client)
        job = _job()
        assert (await x.run(c.Create(c.Write(job, 60, 64, (("queued", {"id": job.id}),), create=True),
                                     "search", 0))).ok
        assert await x.run(c.KeepPicture(job.id, b"\x00\xff", 60))
        picture = await x.run(c.Picture(job.id))  # raw bytes through a client that decodes
        job.status = "failed"
        assert await x.run(c.Write(job, 60, 64, (("failed", {"id": job.id}),)))
        names = [e[1] for e in await x.run(c.ReadEvents(job.id, "0", 10, 100))]
        loaded = await x.run(c.Load(job.id))
        await client.aclose()
        return loaded, names, picture

    loaded, names, picture = asyncio.run(life())
    assert loaded is not None and loaded.status == "failed" and names == ["queued", "failed"]
    assert picture == b"\x00\xff"


def test_the_policy_when_redis_is_away() -> None:
    from cli import stack

    url = f"redis://127.0.0.1:{stack.free_port()}/0"  # nothing listens there
    x = c.SyncExecutor(connect(url, 0.5))
    with pytest.raises(Unavailable) as away:
        x.run(c.Load("x"))
    assert away.value.code == "unavailable" and "unreachable" in away.value.message
    assert x.attempt(c.IsCancelled("x"), False) is False
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        x.run(c.Load("x"), within_s=1.0)  # retried about that long, then given up
    assert 0.5 < time.monotonic() - t0 < 10

    async def away_async() -> tuple[str, int]:
        ax = c.AsyncExecutor(aioredis.Redis.from_url(url, socket_connect_timeout=0.5, decode_responses=True))
        try:
            await ax.run(c.Ping())
        except Unavailable as exc:
            return exc.code, await ax.attempt(c.DropPicture("x"), -1)
        return "", 0

    assert asyncio.run(away_async()) == ("unavailable", -1)

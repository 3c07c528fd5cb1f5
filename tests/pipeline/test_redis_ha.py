"""Redis with high availability: the URL forms pipeline/redisconn.py reads, clients that find a Sentinel group's
primary (and find it again after a failover), and WAIT (pipeline/jobs/commands.py's Replicated) against a real primary and
replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from pipeline import redisconn
from pipeline.jobs.commands import FENCE_KEY, AsyncExecutor, Replicated, SyncExecutor
from tests.redis_ha import RedisGroup


def wait_replicated(client: redis.Redis, replicas: int, timeout_ms: int) -> bool:
    return SyncExecutor(client).run(Replicated(replicas, timeout_ms))


async def await_replicated(client, replicas: int, timeout_ms: int) -> bool:  # type: ignore[no-untyped-def]
    return await AsyncExecutor(client).run(Replicated(replicas, timeout_ms))


URL = "sentinel://:s3cr%40t@h1:26379;h2;[::1]:26380/mymaster/3"


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    t = redisconn.parse_sentinel(URL)
    assert t.hosts == (("h1", 26379), ("h2", 26379), ("::1", 26380))
    assert (t.master, t.db, t.username, t.password) == ("mymaster", 3, None, "s3cr@t")
    assert redisconn.parse_sentinel("sentinel://a:1,b:2/m").hosts == (("a", 1), ("b", 2))
    assert redisconn.parse_sentinel("sentinel://a:1,b:2/m").db == 0


@pytest.mark.parametrize("bad", ["sentinel://h1:26379", "sentinel:///m/0", "sentinel://h:x/m/0",
                                 "sentinel://h:1/m/zero", "sentinel://h:1/m/0/9"])
def test_a_malformed_sentinel_url_is_refused_by_the_settings_without_being_shown(bad: str) -> None:
    from pydantic import ValidationError

    from pipeline.settings import SharedSettings

    with pytest.raises(ValueError):
        redisconn.parse_sentinel(bad)
    with pytest.raises(ValidationError) as err:
        SharedSettings(redis_url=bad.replace("sentinel://", "sentinel://:hunter2@"))
    assert "redis_url" in str(err.value) and "hunter2" not in str(err.value)


def test_the_queue_reads_one_url_per_sentinel_and_the_master_in_its_options() -> None:
    from pydantic import SecretStr

    assert redisconn.kombu_url(URL) == ("sentinel://:s3cr@t@h1:26379/3;sentinel://:s3cr@t@h2:26379/3;"
                                        "sentinel://:s3cr@t@[::1]:26380/3")
    opts = redisconn.kombu_options(URL, 2.0, SecretStr("pw"))
    assert opts["master_name"] == "mymaster" and opts["sentinel_kwargs"]["password"] == "pw"
    assert redisconn.kombu_url("redis://h:1/0") == "redis://h:1/0" and redisconn.kombu_options("redis://h/0", 1) == {}
    assert redisconn.redacted("sentinel://u:pw@h1:1;h2:2/m/0") == "sentinel://u:***@h1:1;h2:2/m/0"


def test_celery_on_a_sentinel_url_uses_our_sentinel_transport_and_celerys_sentinel_backend() -> None:
    from pydantic import SecretStr

    from pipeline.settings import SharedSettings
    from workers.celery_app import client_app

    app = client_app(SharedSettings(redis_url="sentinel://127.0.0.1:1;127.0.0.1:2/grp/4",
                                    redis_sentinel_password=SecretStr("pw")))
    conf = app.conf
    assert conf.broker_transport == "workers.broker:SentinelTransport"
    assert conf.broker_transport_options["master_name"] == "grp"
    assert conf.result_backend_transport_options["sentinel_kwargs"]["password"] == "pw"
    assert type(app.backend).__name__ == "SentinelBackend"
    with app.connection_for_write() as conn:
        assert type(conn.transport).__name__ == "SentinelTransport" and len(conn.alt) == 2
    assert "pw" not in repr(conf.broker_url)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisGroup]:
    g = RedisGroup(tmp_path_factory.mktemp("ha")).start(replicas=1)
    yield g
    g.stop()


@pytest.mark.integration
def test_wait_confirms_with_a_replica_and_not_past_the_replicas_there_are(group: RedisGroup) -> None:
    c = redisconn.connect(group.url(1), 1)
    c.set("k", "v")
    assert wait_replicated(c, 1, 200)
    t0 = time.monotonic()
    assert not wait_replicated(c, 2, 100)  # one replica only: the bound is kept, then False
    assert 0.09 < time.monotonic() - t0 < 1.0
    assert SyncExecutor(c, replicas=0).replicated() and SyncExecutor(c, replicas=1).replicated()
    assert not SyncExecutor(c, replicas=2, wait_ms=10).replicated()
    assert c.pttl(FENCE_KEY) > 0  # the fence it wrote lapses by itself


@pytest.mark.integration
def test_wait_fails_in_its_bound_while_the_replica_is_frozen(group: RedisGroup) -> None:
    primary = group.primary()
    (replica,) = [p for p in group.nodes if p != primary]
    c = redisconn.aconnect(group.url(1), 1, max_connections=2)
    group.freeze(replica)
    try:
        t0 = time.monotonic()
        assert not asyncio.run(await_replicated(c, 1, 100))
        assert time.monotonic() - t0 < 1.0
    finally:
        group.thaw(replica)
    assert asyncio.run(await_replicated(redisconn.aconnect(group.url(1), 1), 1, 1000))


@pytest.mark.integration
def test_clients_follow_a_failover_and_answer_master_not_found_meanwhile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = RedisGroup(tmp_path).start(replicas=1)
    try:
        sync, errors = redisconn.connect(g.url(), 1), set()
        sync.set("before", "1")
        assert wait_replicated(sync, 1, 1000)
        old = g.primary()
        g.kill(old)  # type: ignore[arg-type]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                sync.set("after", "1")
                break
            except redis.ConnectionError as exc:  # MasterNotFoundError is one: the API's 503
                errors.add(type(exc).__name__)
                time.sleep(0.1)
        new = g.primary()
        assert new != old and g.client(new).get("before") == "1" and g.client(new).get("after") == "1"  # type: ignore[arg-type]
        assert errors <= {"ConnectionError", "MasterNotFoundError", "TimeoutError"}, errors

        async def read() -> str | None:
            a = redisconn.aconnect(g.url(), 1, max_connections=2)
            try:
                return await a.get("after")
            finally:
                await a.aclose()

        assert asyncio.run(read()) == "1"
        g.start_node(replica_of=new, port=old)  # the old primary back, as a replica
        g.wait_replicas(new, 1)  # type: ignore[arg-type]
        assert wait_replicated(sync, 1, 1000)
    finally:
        g.stop()


@pytest.mark.integration
def test_the_sentinels_password_is_sent_to_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    g = RedisGroup(tmp_path, sentinel_password="sentinel-pw").start(replicas=0)
    try:
        with pytest.raises(redis.RedisError):
            redisconn.connect(g.url(), 1).ping()
        assert redisconn.connect(g.url(), 1, sentinel_password=SecretStr("sentinel-pw")).ping()
    finally:
        g.stop()


@pytest.mark.integration
def test_a_write_reaching_a_demoted_primary_drops_the_connection_and_counts_as_redis_away(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A managed Redis fails over behind one name: a pooled connection to the old primary must not stay stuck on
    READONLY answers. The write fails as Redis being away (ConnectionError: the API's 503), and once the name
    reaches a primary again (here the same node, promoted back) writes go through, sync and async alike."""
    g = RedisGroup(tmp_path)
    a = g.start_node()
    b = g.start_node(replica_of=a)
    g.wait_replicas(a, 1)
    try:
        sync = redisconn.connect(f"redis://127.0.0.1:{a}/0", 1, retry=None)
        sync.set("k", "1")

        def demote() -> None:
            g.client(b).replicaof("NO", "ONE")
            g.client(a).replicaof("127.0.0.1", str(b))

        async def twice() -> None:
            asy = redisconn.aconnect(f"redis://127.0.0.1:{a}/0", 1, max_connections=2, retry=None)
            await asy.set("k", "1")
            demote()
            with pytest.raises(redis.ConnectionError, match="READONLY"):
                await asy.set("k", "2")
            with pytest.raises(redis.ConnectionError, match="READONLY"):
                sync.set("k", "2")
            g.client(a).replicaof("NO", "ONE")
            assert await asy.set("k", "3") and sync.set("k", "3")
            await asy.aclose()

        asyncio.run(twice())
    finally:
        g.stop()


@pytest.mark.integration
def test_a_job_no_replica_confirms_is_refused_503_and_leaves_nothing_behind(group: RedisGroup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The API on the Sentinel URL with replica_acks=1: 202 while the replica confirms; with the replica frozen,
    503 not_replicated (Retry-After) and no record, no open-set entry, no caller's count, no queue message."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from pipeline.jobs.keys import OPEN_KEY, inflight_key
    from pipeline.settings import Settings

    r = redisconn.connect(group.url(2), 2)
    r.flushdb()
    settings = Settings(redis_url=group.url(2), replica_acks=1, replica_wait_ms=50, limits={"rate_limit_per_min": 0,
                                                                                            "max_jobs_in_flight": 50},
                        reaper_interval_s=0, data_dir=tmp_path)
    primary = group.primary()
    (replica,) = [p for p in group.nodes if p != primary]
    with TestClient(create_app(settings)) as c:
        ok = c.post("/v1/jobs", json={"query": "a red circle"})
        assert ok.status_code == 202, ok.text
        before = set(r.keys("*"))
        queued = r.llen("search")
        group.freeze(replica)
        try:
            refused = c.post("/v1/jobs", json={"query": "a red circle"})
        finally:
            group.thaw(replica)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_replicated", refused.text
    assert refused.headers["retry-after"] == "1"
    assert r.zcard(OPEN_KEY) == 1 and r.llen("search") == queued == 1
    assert set(r.keys("*")) - {FENCE_KEY} == before - {FENCE_KEY}  # no record, events or anything else of it
    counted = r.zrange(inflight_key("anonymous"), 0, -1) if r.exists(inflight_key("anonymous")) else None
    assert counted is None or counted == [ok.json()["id"]], counted


@pytest.mark.integration
def test_an_end_no_replica_confirmed_is_written_again_until_one_does(group: RedisGroup) -> None:
    """A worker's end waits for a replica. Here the end 'vanishes' (the record put back to running, as a failover
    that lost it leaves it) while the replica is frozen: once the replica is back, the end is written again and
    confirmed, and the store says this end is the one that stands."""
    import threading

    from pipeline.jobs.keys import job_key
    from pipeline.jobs.store import JobStore
    from pipeline.types import Job

    r = redisconn.connect(group.url(3), 2)
    store = JobStore(r, 600, 64, retry_s=10, replicas=1, wait_ms=50)
    job = Job(id="a" * 32, status="running", query="q", params={}, created_at=time.time())
    assert store.write(job, ("started", {"id": job.id}), create=False) is False  # no record yet: nothing written
    r.set(job_key(job.id), job.model_dump_json())
    running = r.get(job_key(job.id))
    primary = group.primary()
    (replica,) = [p for p in group.nodes if p != primary]
    group.freeze(replica)

    def failover_lost_it() -> None:
        stack_wait = time.monotonic() + 5
        while time.monotonic() < stack_wait and "done" not in (r.get(job_key(job.id)) or ""):
            time.sleep(0.01)
        r.set(job_key(job.id), running)  # type: ignore[arg-type]
        time.sleep(0.3)  # a wait for the replica fails after the loss too: the store must write the end again
        group.thaw(replica)

    t = threading.Thread(target=failover_lost_it)
    t.start()
    job.status, job.finished_at = "done", time.time()
    t0 = time.monotonic()
    try:
        assert store.write(job, ("done", {"id": job.id}))
    finally:
        t.join()
        group.thaw(replica)
    assert time.monotonic() - t0 < 5
    assert '"done"' in r.get(job_key(job.id))  # type: ignore[operator]
    assert store.x.replicated()

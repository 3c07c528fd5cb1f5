"""Redis with high availability: the URL forms pipeline/redisconn.py reads, clients that find a Sentinel group's
primary (and find it again after a failover), and WAIT (pipeline/jobs/replication.py) against a real primary and
replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from pipeline import redisconn
from pipeline.jobs.replication import FENCE_KEY, await_replicated, wait_replicated
from tests.redis_ha import RedisGroup

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
    assert wait_replicated(c, 0, 1)
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

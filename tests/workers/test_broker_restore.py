"""A channel that closes while the broker is away (a failover with no primary known yet) cannot hand its
reserved messages back; the next channel's periodic sweep does, long before the visibility timeout."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from workers import broker

pytestmark = pytest.mark.integration


def test_messages_a_channel_could_not_hand_back_go_back_at_the_next_sweep(redis_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url(21)
    r = redis.Redis.from_url(url)
    r.flushdb()
    with Connection(url, transport="workers.broker:Transport",
                    transport_options={"visibility_timeout": 3600}) as conn:
        queue = conn.SimpleQueue("restore-test")
        queue.put({"job_id": "a"})
        message = queue.get(timeout=5)  # delivered, not acknowledged: in the unacked set, out of the list
        assert r.llen("restore-test") == 0 and r.hlen("unacked") == 1

        def away(self, client=None):  # type: ignore[no-untyped-def]
            raise redis.ConnectionError("No master found for 'imgsearch'")

        monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", away)
        queue.channel.qos.restore_unacked()
        monkeypatch.undo()
        assert message.delivery_tag in broker._pending and r.llen("restore-test") == 0

        other = conn.channel()
        other.qos.restore_visible(num=10, interval=1)
        assert r.llen("restore-test") == 1 and r.hlen("unacked") == 0 and not broker._pending
        other.qos.restore_visible(num=10, interval=1)  # nothing twice
        assert r.llen("restore-test") == 1
        queue.close()

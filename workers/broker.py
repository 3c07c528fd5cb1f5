"""Kombu's Redis transport, made to survive the broker going away under a threads-pool worker.

Two steps of kombu's run on a channel whose connection is already torn down when Redis stops with jobs in hand,
and fail inside kombu (``'NoneType' object has no attribute 'hostname'`` / ``'client'``), which takes the worker
down instead of letting it reconnect:

- a closing channel puts its unacknowledged messages back on the queue itself (``restore_unacked``);
- a job that ends after the reconnection acknowledges its message on the dead channel.

Here neither is attempted on a dead channel: those messages stay in the broker's unacked set, from which
Redis's visibility timeout restores them in the end, and the API's rescue sends a job stranded so again
within ``rescue_after_s``. On a live channel (a worker stopping for a rolling restart, after its soft shutdown)
the messages it could not finish go back to the head of their queue at once, for the next worker. A job run
twice still ends once (the first end wins), and one that already ended is skipped when its message comes back.

A ``sentinel://`` URL gets the same two fixes on kombu's Sentinel transport (``SentinelTransport``).

Checked on the kombu versions that pipeline/vendor.py names (pyproject.toml pins them).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

from pipeline import redisconn, vendor

log = logging.getLogger(__name__)
vendor.within("kombu")  # checked on a range of kombu's versions; outside it, say so (tests/test_vendor.py fails)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def _dead(self) -> bool:
        return getattr(self.channel, "connection", None) is None

    def ack(self, delivery_tag: Any) -> None:
        if self._dead():
            log.warning("message %s not acknowledged: its channel closed with the broker connection", delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._dead():
            log.warning("message %s not rejected: its channel closed with the broker connection", delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        if self._dead():
            log.warning("%d messages left to the visibility timeout: their channel closed with the broker "
                        "connection", len(self._delivered or ()))
            return
        try:
            super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - the broker went away meanwhile: the visibility timeout restores
            log.warning("messages not handed back at close (%s: %s); the visibility timeout restores them",
                        type(exc).__name__, exc)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    # a write answered READONLY (a managed Redis failed over behind its name) drops the connection: the
    # consumer reconnects to whatever the name points at now (pipeline/redisconn.py)
    connection_class = redisconn.Connection
    connection_class_ssl = redisconn.SSLConnection


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelChannel(kombu_redis.SentinelChannel):  # type: ignore[misc]
    """Kombu's Sentinel channel (it asks the Sentinels for the primary on every new connection, so a worker
    follows a failover by reconnecting) with the same QoS as above."""

    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    """The transport for a ``sentinel://`` URL (workers/celery_app.py chooses it)."""

    Channel = SentinelChannel

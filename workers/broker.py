"""Kombu's Redis transport, made to survive the broker going away under a threads-pool worker.

Two steps of kombu's run on a channel whose connection is already torn down when Redis stops with jobs in hand,
and fail inside kombu (``'NoneType' object has no attribute 'hostname'`` / ``'client'``), which takes the worker
down instead of letting it reconnect:

- a closing channel puts its unacknowledged messages back on the queue itself (``restore_unacked``);
- a job that ends after the reconnection acknowledges its message on the dead channel.

Here neither is attempted on a dead channel: those messages stay in the broker's unacked set, from which
Redis's visibility timeout restores them in the end, and the API's rescue sends a job stranded so again
within ``rescue_after_s``. On a live channel (a worker stopping for a rolling restart, after its soft shutdown)
the messages it could not finish go back to the head of their queue at once, for the next worker; if the broker
fails that moment (a failover with no primary known yet), the channel that replaces it hands them back at its
first sweep instead. A job run
twice still ends once (the first end wins), and one that already ended is skipped when its message comes back.

A ``sentinel://`` URL gets the same two fixes on kombu's Sentinel transport (``SentinelTransport``).

Checked on the kombu versions that pipeline/vendor.py names (pyproject.toml pins them).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kombu.transport import redis as kombu_redis

from pipeline import redisconn, vendor

log = logging.getLogger(__name__)
# delivery tags a closing channel could not hand back (the broker away): this process's next sweep does
_pending: set[str] = set()
_pending_lock = threading.Lock()
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
        tags: list[Any] = list(self._delivered or ())
        try:
            super().restore_unacked(client)
        except Exception as exc:  # noqa: BLE001 - the broker went away meanwhile (no primary known, a failover)
            with _pending_lock:
                _pending.update(tags)
            log.warning("%d messages not handed back at close (%s: %s); the next channel hands them back",
                        len(tags), type(exc).__name__, exc)

    def restore_visible(self, *args: Any, **kw: Any) -> Any:
        """Kombu's periodic sweep (every ``unacked_restore_interval``), after handing back what a channel closed
        with the broker away could not: reserved messages, not yet started, that otherwise wait for the
        visibility timeout (past their jobs' deadlines) while a busy queue keeps the rescue from sending them.
        ``restore_by_tag`` takes each from the unacked set in a transaction, so none goes back twice, and one
        acknowledged meanwhile is not there to go back. A connection error leaves the rest for the next sweep."""
        with _pending_lock:
            tags = list(_pending)
        for tag in tags:
            self.restore_by_tag(tag)
            with _pending_lock:
                _pending.discard(tag)
        if tags:
            log.warning("handed back %d messages a closed channel held", len(tags))
        return super().restore_visible(*args, **kw)


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

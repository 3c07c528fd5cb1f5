"""Kombu's Redis transport, made to survive the broker going away under a threads-pool worker.

Two steps of kombu's run on a channel whose connection is already torn down when Redis stops with jobs in hand,
and fail inside kombu (``'NoneType' object has no attribute 'hostname'`` / ``'client'``), which takes the worker
down instead of letting it reconnect:

- a closing channel puts its unacknowledged messages back on the queue itself (``do_restore``);
- a job that ends after the reconnection acknowledges its message on the dead channel.

Here neither is attempted on a dead channel: those messages stay in the broker's unacked set, from which
Redis's visibility timeout restores them in the end, and the API's rescue sends a job stranded so again
within ``rescue_after_s``. A job run twice still ends once (the first end wins), and one that already ended is
skipped when its message comes back.

Checked on the kombu versions that pipeline/vendor.py names (pyproject.toml pins them).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

from pipeline import vendor

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


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    do_restore = False


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel

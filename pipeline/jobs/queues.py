"""The broker's Redis layout, known here and nowhere else: which queues the product runs, and how kombu's Redis
transport keeps a queue's messages.

Kombu keeps a queue as up to four lists (one per priority step: the queue's name, then the name + "\\x06\\x16" + 3,
6 and 9), and a message a worker has taken but not acknowledged (reserved, prefetched or running: acks late) in the
hash ``unacked`` (delivery tag -> JSON [message, exchange, routing key]), indexed by the zset ``unacked_index``. A
list's length alone misses every reserved message: a saturated fleet reads about zero. These names are kombu's
defaults; tests/workers/test_fleet.py checks them against the transport (workers/broker.py subclasses that
transport). Admission's queue cap, the rescue's "is the queue empty" and the autoscaler's depth all read the
lists through ``pipeline.jobs.commands``."""

from __future__ import annotations

from pipeline.settings import SharedSettings

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"


def queues(settings: SharedSettings) -> dict[str, str]:
    """The product's queues by role: what /metrics and ``imgsearch health`` report depths for."""
    return {"search": settings.search_queue, "ingest": settings.ingest_queue, "embed": settings.embed_queue}


def waiting_lists(queue: str) -> tuple[str, ...]:
    """The Redis lists that hold ``queue``'s waiting messages, one per priority step."""
    return tuple(f"{queue}{PRIORITY_SEP}{p}" if p else queue for p in PRIORITY_STEPS)

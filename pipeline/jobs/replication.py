"""Acknowledged means replicated: ``WAIT`` for replicas after a job's creation and its end.

Replication is asynchronous: a primary acknowledges a write before any replica has it, and a failover in that
moment loses it. ``WAIT n t`` blocks until ``n`` replicas confirmed every write *this connection* made, or ``t``
ms passed, and answers how many did. The writes worth waiting for come from several connections (the job's
record from the store's, the queue message from the broker's), so ``wait_replicated`` first writes a fence on
the connection it then waits on: a replica that holds the fence holds everything the primary had applied
before it, every connection's. Both commands go in one pipeline, so they share a connection.

What stays best effort, unwaited: caches (a miss is always an option), the events between a job's start and
its end (the end's record and events carry everything a client needs), heartbeats (they are rewritten every few
seconds), the rate limit's buckets (a lost token is a refill). A job's start is not waited either: lost, the job
is queued again on the new primary, and the rescue or the redelivered message runs it; the first end wins.
"""

from __future__ import annotations

from typing import Any

FENCE_KEY = "imgsearch:replication:fence"
_FENCE_TTL_MS = 60_000


def _pipeline(client: Any, replicas: int, timeout_ms: int) -> Any:
    pipe = client.pipeline(transaction=False)
    pipe.set(FENCE_KEY, "1", px=_FENCE_TTL_MS)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    return pipe


def wait_replicated(client: Any, replicas: int, timeout_ms: int) -> bool:
    """Whether at least ``replicas`` replicas confirmed everything the primary applied so far, within
    ``timeout_ms`` (sync client). True at once for ``replicas`` <= 0. Redis errors propagate."""
    if replicas <= 0:
        return True
    _, confirmed = _pipeline(client, replicas, timeout_ms).execute()
    return int(confirmed) >= replicas


async def await_replicated(client: Any, replicas: int, timeout_ms: int) -> bool:
    """``wait_replicated`` through an async client."""
    if replicas <= 0:
        return True
    _, confirmed = await _pipeline(client, replicas, timeout_ms).execute()
    return int(confirmed) >= replicas

"""Every Redis key of a job's life: its record, event stream, cancel flag, resend count and query image, the open set the
reaper walks, the workers' heartbeats, and the per-caller admission keys (token bucket, jobs in flight).

(The caches keep their keys in ``pipeline.cache`` and the fleet's counters in ``pipeline.metrics``: neither is
part of a job's life.)"""

from __future__ import annotations

PREFIX = "imgsearch"
LIMITS_PREFIX = f"{PREFIX}:limits"
TERMINAL = ("done", "failed")

# every job that has not ended, scored by its deadline: what the reaper walks
OPEN_KEY = f"{PREFIX}:jobs:open"
# the names of the workers that beat (host:pid): readers read this set and each member's key, and never scan the
# keyspace for heartbeats (which cost thousands of SCAN calls with a few hundred thousand keys in Redis)
WORKERS_KEY = f"{PREFIX}:workers"
HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"  # what readers once scanned for (bench.health measures that way still)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:cancel"


def picture_key(job_id: str) -> str:
    """An image query's picture (checked and normalised by the API, JPEG), kept as long as the job's record."""
    return f"{PREFIX}:job:{job_id}:image"


def resent_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:resent"


def heartbeat_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


def bucket_key(caller_id: str) -> str:
    """The caller's token bucket (rate limit)."""
    return f"{LIMITS_PREFIX}:bucket:{caller_id}"


def inflight_key(caller_id: str) -> str:
    """The caller's jobs queued or running, scored by deadline (the in-flight cap)."""
    return f"{LIMITS_PREFIX}:inflight:{caller_id}"


def streams_key(caller_id: str) -> str:
    """The caller's open event streams, scored by when each must have ended (the per-caller stream cap)."""
    return f"{LIMITS_PREFIX}:streams:{caller_id}"

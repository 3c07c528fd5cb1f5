"""Fleet-wide counters and histograms, kept in Redis by the workers and read by the API's /metrics: every
worker process adds to the same keys, so one scrape of any API instance sees the whole fleet. Writes are
one pipelined round trip per job, after the job ended, and never fail the job."""

from __future__ import annotations

import logging
from typing import Any

import redis

log = logging.getLogger(__name__)

PREFIX = "imgsearch:metrics"
# stage latency buckets, milliseconds (Prometheus wants seconds: the API converts)
BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
STAGES = ("encode", "retrieve", "fetch", "rerank", "fuse", "total", "queue_wait", "cache")
KINDS = ("text", "like", "image")  # what a query is: a label on the stage histograms and the outcome counters


def stage_key(stage: str, kind: str = "text") -> str:
    return f"{PREFIX}:stage:{stage}" if kind == "text" else f"{PREFIX}:stage:{kind}:{stage}"


def jobs_field(kind: str, outcome: str) -> str:
    """The field of JOBS counting ``kind``'s jobs that ended ``outcome`` (text's keep their first names)."""
    return outcome if kind == "text" else f"{kind}:{outcome}"


JOBS = f"{PREFIX}:jobs"  # outcome (or kind:outcome) -> count
CACHE = f"{PREFIX}:cache"  # result_hit, result_miss, features_local, features_redis, features_blob
INGEST = f"{PREFIX}:ingest"  # ingested, duplicates, failed, rejected, runs


def record_job(client: redis.Redis, status: str, timings: dict[str, float] | None,
               stats: dict[str, int] | None, kind: str = "text") -> None:
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(JOBS, jobs_field(kind, status), 1)
        for stage, ms in (timings or {}).items():
            if stage not in STAGES:
                continue
            key = stage_key(stage, kind)
            for le in BUCKETS_MS:
                if ms <= le:
                    pipe.hincrby(key, f"le:{le}", 1)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum_ms", float(ms))
        stats = stats or {}
        if status == "done":
            pipe.hincrby(CACHE, "result_hit" if stats.get("result_cache") else "result_miss", 1)
        for k in ("features_local", "features_redis", "features_blob"):
            if stats.get(k):
                pipe.hincrby(CACHE, k, int(stats[k]))
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("metrics not recorded: %s", exc)


def record_ingest(client: redis.Redis, report: dict[str, Any]) -> None:
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(INGEST, "runs", 1)
        for k in ("ingested", "duplicates", "rejected"):
            pipe.hincrby(INGEST, k, int(report.get(k, 0)))
        pipe.hincrby(INGEST, "failed", len(report.get("failed", {})))
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("ingest metrics not recorded: %s", exc)

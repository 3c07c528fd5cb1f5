"""Prometheus exposition: this API process's own request metrics, and the fleet's from Redis (stage latency
histograms, jobs by outcome, cache hits, queue depth, live workers), read at scrape time."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from pipeline import metrics as fleet
from pipeline.jobs import fleet as heartbeats

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("imgsearch_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("imgsearch_http_request_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REAPED = Counter("imgsearch_jobs_reaped", "Jobs this API process ended because no worker did by their deadline",
                 registry=REGISTRY)
RESCUED = Counter("imgsearch_jobs_rescued", "Stranded jobs this API process sent again (lost message, dead worker)",
                  registry=REGISTRY)


def observe(route: str, method: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route).observe(seconds)


def _fields(raw: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in raw.items()}


async def fleet_families(r: Any, queues: dict[str, str]) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    kinds_stages = [(kind, stage) for kind in fleet.KINDS for stage in fleet.STAGES]
    for kind, stage in kinds_stages:
        pipe.hgetall(fleet.stage_key(stage, kind))
    pipe.hgetall(fleet.JOBS)
    pipe.hgetall(fleet.CACHE)
    pipe.hgetall(fleet.INGEST)
    answers = await pipe.execute()
    depths = await heartbeats.queue_depths(r, list(queues.values()))
    workers = await heartbeats.aread(r)
    out: list[Any] = []
    hist = HistogramMetricFamily("imgsearch_stage_seconds", "Search job time by query kind (text, like, image) and "
                                 "stage (all workers)", labels=["kind", "stage"])
    for (kind, stage), raw in zip(kinds_stages, answers, strict=False):
        f = _fields(raw)
        if not f.get("count"):
            continue
        buckets = [(str(le / 1000), f.get(f"le:{le}", 0.0)) for le in fleet.BUCKETS_MS] + [("+Inf", f["count"])]
        hist.add_metric([kind, stage], buckets, f.get("sum_ms", 0.0) / 1000)
    out.append(hist)
    n = len(kinds_stages)
    jobs = CounterMetricFamily("imgsearch_jobs", "Search jobs ended, by query kind and outcome (all workers)",
                               labels=["kind", "outcome"])
    for field, v in sorted(_fields(answers[n]).items()):
        kind, _, outcome = field.rpartition(":")
        jobs.add_metric([kind or "text", outcome], v)
    out.append(jobs)
    cache = _fields(answers[n + 1])
    hits = CounterMetricFamily("imgsearch_cache_lookups", "Cache lookups: result cache hits and misses, and where "
                               "candidates' features came from", labels=["cache", "outcome"])
    for name, (cache_name, outcome) in {"result_hit": ("results", "hit"), "result_miss": ("results", "miss"),
                                        "features_local": ("features", "in_process"),
                                        "features_redis": ("features", "redis"),
                                        "features_blob": ("features", "blob_store")}.items():
        hits.add_metric([cache_name, outcome], cache.get(name, 0.0))
    out.append(hits)
    looked = cache.get("result_hit", 0.0) + cache.get("result_miss", 0.0)
    out.append(GaugeMetricFamily("imgsearch_result_cache_hit_ratio", "Result cache hits over lookups, since the "
                                 "counters began", value=cache.get("result_hit", 0.0) / looked if looked else 0.0))
    ingest = CounterMetricFamily("imgsearch_ingest_items", "Ingest outcomes over all runs", labels=["outcome"])
    for k, v in sorted(_fields(answers[n + 2]).items()):
        ingest.add_metric([k], v)
    out.append(ingest)
    depth = GaugeMetricFamily("imgsearch_queue_depth", "Tasks waiting in each queue (all priorities)", labels=["queue"])
    reserved = GaugeMetricFamily("imgsearch_queue_reserved", "Tasks workers took and have not acknowledged "
                                 "(prefetched or running)", labels=["queue"])
    backlog = GaugeMetricFamily("imgsearch_queue_backlog", "Tasks waiting plus reserved: what an autoscaler "
                                "should read (a list's length misses reserved tasks)", labels=["queue"])
    for name, q in queues.items():
        waiting, held = depths[q]
        depth.add_metric([name], float(waiting))
        reserved.add_metric([name], float(held))
        backlog.add_metric([name], float(waiting + held))
    out += [depth, reserved, backlog]
    out.append(GaugeMetricFamily("imgsearch_workers_live", "Workers with a fresh heartbeat", value=len(workers)))
    out.append(GaugeMetricFamily("imgsearch_scrape_timestamp_seconds", "When this scrape read Redis", value=time.time()))
    return out


class _Static:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def render(families: list[Any]) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Static(families))  # type: ignore[arg-type]
    return generate_latest(REGISTRY) + generate_latest(reg)

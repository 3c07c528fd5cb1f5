"""The Celery app. It is configured from settings lazily, on first use, so importing it reads nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from pipeline import redisconn
from pipeline.settings import IngestSettings, SharedSettings, WorkerSettings, get_ingest_settings

SEARCH_TASK = "imgsearch.search"
INGEST_TASK = "imgsearch.ingest"
EMBED_TASK = "imgsearch.ingest_batch"  # one batch of a fanned-out run (pipeline/ingest/fanout.py)
TAKEDOWN_TASK = "imgsearch.takedown"
NOOP_TASK = "imgsearch.noop"  # ends a job at once: the queue's own round trip, for bench.load


def schedule(spec: str) -> Any:
    """A beat schedule from a crontab line ("m h dom mon dow") or a number of seconds between runs."""
    from celery.schedules import crontab

    spec = spec.strip()
    try:
        return float(spec)
    except ValueError:
        pass
    fields = spec.split()
    if len(fields) != 5:
        raise ValueError(f"IMGSEARCH_INGEST_SCHEDULE={spec!r}: want a crontab line of 5 fields or a number of seconds")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


# the API must answer 503 quickly when Redis is down, not retry for long: a publish's retries, and the client's
# result backend's (client_app)
QUICK_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def celery_config(settings: SharedSettings) -> dict[str, Any]:
    url = settings.redis_url
    # a Sentinel group (pipeline/redisconn.py): kombu's Sentinel transport and Celery's Sentinel result backend,
    # one sentinel:// URL per Sentinel and the master's name (and the Sentinels' password) in their options
    sentinel = redisconn.kombu_options(url, settings.redis_socket_timeout_s, settings.redis_sentinel_password)
    return dict(
        broker_url=redisconn.kombu_url(url),
        # kombu's Redis transport (or its Sentinel one), see workers/broker.py
        broker_transport="workers.broker:SentinelTransport" if sentinel else "workers.broker:Transport",
        result_backend=redisconn.kombu_url(url),
        # JSON only: nothing pickled crosses a process or the network
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        # a job is acknowledged only once it ended; a job whose worker died is delivered again
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        # SIGTERM (a deploy; `imgsearch worker` maps it to Celery's cold shutdown) stops consuming, gives the jobs
        # in hand this long, then cancels the rest, whose messages the channel hands back (workers/broker.py)
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_s if isinstance(settings, WorkerSettings) else 0.0,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  # sweep for a dead worker's jobs often enough for the timeout to mean it
                                  "unacked_restore_interval": min(10, max(1, settings.visibility_timeout // 4)),
                                  "unacked_restore_throttle": 1,
                                  "socket_timeout": settings.redis_socket_timeout_s,
                                  "socket_connect_timeout": settings.redis_socket_timeout_s, **sentinel},
        result_backend_transport_options={"socket_timeout": settings.redis_socket_timeout_s,
                                          "socket_connect_timeout": settings.redis_socket_timeout_s, **sentinel},
        # the result backend's own connections (the results an explanation or a takedown is awaited on, and the
        # channel Celery subscribes to before such a send) read their timeouts from these, not from the transport
        # options above: without them a frozen Redis held those routes' threads for as long as it stayed frozen
        redis_socket_timeout=settings.redis_socket_timeout_s,
        redis_socket_connect_timeout=settings.redis_socket_timeout_s,
        result_expires=settings.job_ttl_s,
        # ingest runs on its own queue (its own workers), so a run never holds a search worker; a takedown is
        # quick and goes to the search workers, which hold the stores
        task_routes={SEARCH_TASK: {"queue": settings.search_queue}, INGEST_TASK: {"queue": settings.ingest_queue},
                     TAKEDOWN_TASK: {"queue": settings.search_queue},
                     # a fanned-out run's batches go to any worker of the embed queue
                     EMBED_TASK: {"queue": settings.embed_queue},
                     NOOP_TASK: {"queue": settings.search_queue}},
        # beat's schedule, read from ingest's settings (an app that only sends, the API's, has none)
        beat_schedule={"ingest": {"task": INGEST_TASK, "schedule": schedule(settings.ingest_schedule),
                                  "args": [{"source": settings.ingest_source}],
                                  "options": {"queue": settings.ingest_queue}}}
        if isinstance(settings, IngestSettings) else {},
        task_default_queue=settings.search_queue,
        task_publish_retry=True,
        task_publish_retry_policy=QUICK_RETRY,
        broker_connection_timeout=settings.redis_socket_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True, task_send_sent_event=True,
    )


def client_app(settings: SharedSettings) -> Celery:
    """A Celery app that only sends tasks (by name), for the API: it holds its own broker connections. Where it
    awaits a result (an explanation, a takedown) the result backend retries as briefly as a publish does (its
    default: 20 tries a second apart), so a Redis that is away ends the wait in seconds, as a 503."""
    client = Celery("imgsearch-client", set_as_current=False)
    conf = celery_config(settings)
    conf["result_backend_transport_options"] = {**conf["result_backend_transport_options"], "retry_policy": QUICK_RETRY}
    client.conf.update(conf)
    return client


def send_job(client: Celery, task: str, job_id: str, queue: str) -> None:
    """Send a job's task by name (its id the task's id). Its outcome lives in the job's record, never in Celery's
    result backend: ``ignore_result`` keeps Celery from subscribing to the task's result channel first, a
    connection that has no socket timeout of its own and so held a send as long as Redis was frozen (33 s in a
    failover), where the publish alone fails within the socket timeout and the API answers 503."""
    client.send_task(task, args=[{"job_id": job_id}], task_id=job_id, queue=queue, ignore_result=True)


def batch_sender(settings: SharedSettings) -> Callable[[dict[str, Any]], None]:
    """How a fanned-out ingest run's coordinator sends a batch: by name, to the embed queue (no result: see
    ``send_job``)."""
    client = client_app(settings)

    def send(payload: dict[str, Any]) -> None:
        client.send_task(EMBED_TASK, args=[payload], queue=settings.embed_queue, ignore_result=True)

    return send


# The worker's (and beat's) app. Its configuration is a promise, read when first needed, never at import: ingest's
# settings, since a worker may serve the ingest queue and beat schedules it (a search task reads the worker's own).
app = Celery("imgsearch", include=["workers.tasks"])
app.add_defaults(lambda: celery_config(get_ingest_settings()))

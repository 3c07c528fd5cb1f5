"""Celery tasks: deserialise, call one pipeline function, report. No search logic lives here."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown
from pydantic import BaseModel

from pipeline.jobs.runner import end_empty, run_job
from workers import runtime
from workers.celery_app import INGEST_TASK, NOOP_TASK, SEARCH_TASK, TAKEDOWN_TASK, app

log = logging.getLogger(__name__)


class SearchTask(BaseModel):
    job_id: str


# the job record is the result: nothing is written to the result backend
@app.task(name=SEARCH_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def search(payload: dict[str, Any]) -> dict[str, Any]:
    task = SearchTask.model_validate(payload)
    job = run_job(task.job_id, runtime.get().searcher, runtime.get().store)
    return {"id": task.job_id, "status": job.status if job else "missing"}


@app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop(payload: dict[str, Any]) -> None:
    """A job ended with no work, through the same record and event writes as a search: what the queue itself
    costs (bench.load measures it against a bare Redis round trip)."""
    end_empty(SearchTask.model_validate(payload).job_id, runtime.get().store)


_embedders: list[Any] | None = None  # this process's embed streams for ingest


class IngestTask(BaseModel):
    source: str | None = None  # default: IMGSEARCH_INGEST_SOURCE
    folder: str | None = None
    fresh: bool = False


class TakedownTask(BaseModel):
    ids: list[str]


@app.task(name=INGEST_TASK, acks_late=True, reject_on_worker_lost=True)
def ingest(payload: dict[str, Any]) -> dict[str, Any]:
    """One ingest run with this worker's engines. A run killed with its worker is delivered again and resumes
    from its checkpoint; a run started while another holds the ledger's lock ends at once, saying so."""
    from engines.registry import load_image_engines
    from pipeline import metrics
    from pipeline.errors import Unavailable
    from pipeline.ingest import make_source, run_ingest
    from pipeline.settings import get_ingest_settings

    global _embedders
    task = IngestTask.model_validate(payload)
    rt = runtime.get()
    s = get_ingest_settings()  # the ingest deployable's settings: sources, downloads (read once per process)
    if _embedders is None:  # once per process, as the engines
        _embedders = load_image_engines(s, rt.engines)
    try:
        report = run_ingest(s, make_source(s, task.source, task.folder), rt.engines.image, rt.engines.reranker,
                            rt.stores.vectors, rt.stores.blobs, fresh=task.fresh, embedders=_embedders)
    except Unavailable as exc:
        if exc.code != "ingest_running":
            raise
        log.info("ingest: %s", exc.message)
        return {"status": "skipped", "why": exc.message}
    metrics.record_ingest(rt.store.r, report.as_dict())
    return {"status": "done", **report.as_dict()}


@app.task(name=TAKEDOWN_TASK, acks_late=True)
def takedown(payload: dict[str, Any]) -> dict[str, Any]:
    from workers.admin import takedown_posts

    task = TakedownTask.model_validate(payload)
    rt = runtime.get()
    return {"removed": takedown_posts(task.ids, rt.settings, rt.stores, [rt.engines.reranker.version])}


# Engines load once per process that runs tasks: each prefork child, or the main process of a solo or
# threads pool. The prefork parent never loads a model (it would only be copied into every child).
@worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    runtime.load()


@worker_init.connect
def _load_in_main(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "solo" in name or "thread" in name:
        runtime.load()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop(**_: Any) -> None:
    runtime.shutdown()

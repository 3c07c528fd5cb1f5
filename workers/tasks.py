"""Celery tasks: deserialise, call one pipeline function, report. No search logic lives here."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown
from pydantic import BaseModel, Field

from pipeline.jobs.runner import end_empty, run_job
from pipeline.search.explain import EXPLAIN_TASK
from pipeline.settings import get_ingest_settings
from workers import runtime
from workers.celery_app import EMBED_TASK, INGEST_TASK, NOOP_TASK, SEARCH_TASK, TAKEDOWN_TASK, app, batch_sender

log = logging.getLogger(__name__)


class SearchTask(BaseModel):
    job_id: str


# the job record is the result: nothing is written to the result backend
@app.task(name=SEARCH_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def search(payload: dict[str, Any]) -> dict[str, Any]:
    task = SearchTask.model_validate(payload)
    job = run_job(task.job_id, runtime.get().searcher, runtime.get().store)
    return {"id": task.job_id, "status": job.status if job else "missing"}


class ExplainTask(BaseModel):
    job_id: str
    post_ids: list[str]


# the explanations are the result (JSON, in the result backend): the API waits on it
@app.task(name=EXPLAIN_TASK, acks_late=True)
def explain(payload: dict[str, Any]) -> dict[str, Any]:
    from pipeline.errors import NotFound

    task = ExplainTask.model_validate(payload)
    rt = runtime.get()
    job = rt.store.load(task.job_id)
    if job is None:
        raise NotFound(f"job {task.job_id} is gone")
    return rt.searcher.explain_posts(job, task.post_ids)


@app.task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop(payload: dict[str, Any]) -> None:
    """A job ended with no work, through the same record and event writes as a search: what the queue itself
    costs (bench.load measures it against a bare Redis round trip)."""
    end_empty(SearchTask.model_validate(payload).job_id, runtime.get().store)


def _embed_streams(rt: runtime.Runtime) -> list[Any]:
    return rt.embedders.get()  # once per process, as the engines


class IngestTask(BaseModel):
    source: str | None = None  # default: IMGSEARCH_INGEST_SOURCE
    folder: str | None = None
    fresh: bool = False


class BatchPayload(BaseModel):
    run_id: str = Field(pattern=r"^[0-9a-f]{12}$")
    source: str = Field(max_length=64)
    ids: list[str] = Field(max_length=512)
    versions: str = Field(max_length=512)
    folder: str | None = Field(None, max_length=4096)  # the folder source's folder, as the coordinator read it


class TakedownTask(BaseModel):
    ids: list[str]


@app.task(name=INGEST_TASK, acks_late=True, reject_on_worker_lost=True)
def ingest(payload: dict[str, Any]) -> dict[str, Any]:
    """One ingest run: with this worker's engines, or (``ingest_fanout``) planned as batches for the embed
    queue's workers. A run killed with its worker is delivered again and resumes from its checkpoint; a run
    started while another holds the ledger's lease ends at once, saying so."""
    from pipeline import metrics
    from pipeline.errors import Unavailable
    from pipeline.ingest import make_source, run_ingest
    from pipeline.ingest.fanout import run_fanout
    from pipeline.versions import ModelVersions

    task = IngestTask.model_validate(payload)
    rt = runtime.get()
    s = get_ingest_settings()  # the ingest deployable's settings: sources, downloads, fan-out
    try:
        source = make_source(s, task.source, task.folder)
        if s.ingest_fanout:
            report = run_fanout(s, source, batch_sender(s), ModelVersions.of(rt.engines.image, rt.engines.reranker),
                                fresh=task.fresh)
        else:
            report = run_ingest(s, source, rt.engines.image, rt.engines.reranker, rt.stores.vectors, rt.stores.blobs,
                                fresh=task.fresh, embedders=_embed_streams(rt))
    except Unavailable as exc:
        if exc.code != "ingest_running":
            raise
        log.info("ingest: %s", exc.message)
        return {"status": "skipped", "why": exc.message}
    metrics.record_ingest(rt.store.r, report.as_dict())
    return {"status": "done", **report.as_dict()}


@app.task(name=EMBED_TASK, acks_late=True, reject_on_worker_lost=True)
def ingest_batch(payload: dict[str, Any]) -> dict[str, Any]:
    """One batch of a fanned-out ingest run: claim its items in the ledger, then download, dedup, embed, write
    and settle them. Delivered twice, it finds them claimed or settled and does nothing."""
    from pipeline.ingest.fanout import BatchTask
    from pipeline.ingest.fanout import ingest_batch as run_batch

    task = BatchTask.from_payload(BatchPayload.model_validate(payload).model_dump())
    rt = runtime.get()
    return run_batch(get_ingest_settings(), task, rt.engines.image, rt.engines.reranker, rt.stores.vectors, rt.stores.blobs,
                     rt.ledger.get(), embedders=_embed_streams(rt))


@app.task(name=TAKEDOWN_TASK, acks_late=True)
def takedown(payload: dict[str, Any]) -> dict[str, Any]:
    from workers.admin import takedown_posts

    task = TakedownTask.model_validate(payload)
    rt = runtime.get()
    return {"removed": takedown_posts(task.ids, rt.settings, rt.stores, rt.feature_versions())}


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
        _stop_on_an_early_sigterm()


def _stop_on_an_early_sigterm() -> None:
    """Celery installs its SIGTERM handler (a shutdown that ends in worker_shutdown, which removes the heartbeat)
    only when the worker starts, after worker_init has loaded the engines and started the heartbeat. A SIGTERM in
    between ended the process at once and left its heartbeat for the TTL, so /readyz listed a stopped worker (seen
    on a slow 2-core CPU: a deploy's SIGTERM right after the first heartbeat). Until Celery's handler replaces this
    one, a SIGTERM stops the runtime (the heartbeat's key goes with it), then ends the process as it would have."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop(signum: int, _frame: Any) -> None:
        runtime.shutdown()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop(**_: Any) -> None:
    runtime.shutdown()

"""Two worker "hosts" (separate data dirs and host names) sharing one Redis, PostgreSQL (the ledger), the
Pinecone stand-in and the GCS emulator. A run whose coordinator is killed is completed by a coordinator on
another host, and searches are then answered by either host, alike; a run fanned out over both survives one
host killed while both hold batches: every item ingested once, none lost."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from cli import stack
from pipeline.errors import Unavailable
from pipeline.ingest import FolderSource, Ledger
from pipeline.ingest.fanout import run_fanout
from pipeline.ingest.ledger import CLAIMED, INGESTED
from pipeline.jobs.store import JobStore, connect
from pipeline.settings import Settings
from pipeline.versions import ModelVersions
from standins.faults import FaultProxy
from tests.conftest import settings_env
from tests.live import Live
from workers.celery_app import batch_sender

pytestmark = [pytest.mark.integration, pytest.mark.multihost]
DB, NS, BATCH = 21, "multihost", 4


@dataclass
class Pool:
    env: dict[str, dict[str, str]]  # host name -> its environment
    logs: Path
    proxy: FaultProxy  # in front of the Pinecone stand-in: the test stalls writes with it
    ledger_url: str
    base: str = ""
    hosts: dict[str, stack.Proc] = field(default_factory=dict)
    api: stack.Proc | None = None

    def start_host(self, host: str) -> None:
        self.hosts[host] = stack.start_worker(self.env[host], self.logs / f"{host}.log", name=host,
                                              queue="search,embed", pool="threads", concurrency=1)

    def settings(self) -> Settings:
        """The coordinator's settings: the hosts', on a third host name."""
        given = {k.removeprefix("IMGSEARCH_").lower(): v for k, v in self.env["host-a"].items()
                 if k.startswith("IMGSEARCH_")}
        return Settings(**{**given, "host_name": "coordinator"})


def _host_env(base: dict[str, str], host: str, data: Path) -> dict[str, str]:
    return {**base, "IMGSEARCH_DATA_DIR": str(data), "IMGSEARCH_HOST_NAME": host}


@pytest.fixture(scope="module")
def pool(redis_server, postgres_server, pinecone_standin, gcs_emulator, tiny_models,  # type: ignore[no-untyped-def]
         tmp_path_factory) -> Iterator[Pool]:
    proxy = FaultProxy("127.0.0.1", int(pinecone_standin.host.rsplit(":", 1)[1]))
    ledger_url = postgres_server.database("multihost")
    base = settings_env(tmp_path_factory.mktemp("unused"), tiny_models, redis_server.url(DB),
                        IMGSEARCH_VECTOR_STORE="pinecone", IMGSEARCH_PINECONE_API_KEY=pinecone_standin.api_key,
                        IMGSEARCH_PINECONE_HOST=proxy.url, IMGSEARCH_NAMESPACE=NS,
                        IMGSEARCH_BLOB_STORE="gcs", IMGSEARCH_GCS_BUCKET="imgsearch-test", IMGSEARCH_GCS_PREFIX=NS,
                        STORAGE_EMULATOR_HOST=gcs_emulator.host, IMGSEARCH_LEDGER_URL=ledger_url,
                        IMGSEARCH_INGEST_FANOUT="true", IMGSEARCH_INGEST_BATCH_SIZE=str(BATCH),
                        IMGSEARCH_INGEST_CLAIM_TTL_S="4", IMGSEARCH_INGEST_DEDUP="off",
                        IMGSEARCH_CACHE_RESULTS_TTL_S="0", IMGSEARCH_WARM_UP="false", IMGSEARCH_STORE_RETRIES="1")
    env = {h: _host_env(base, h, tmp_path_factory.mktemp(h)) for h in ("host-a", "host-b")}
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    p = Pool(env, tmp_path_factory.mktemp("multihost-logs"), proxy, ledger_url)
    try:
        for h in env:
            p.start_host(h)
        port = stack.free_port()
        p.base = f"http://127.0.0.1:{port}"
        p.api = stack.start_api(env["host-a"], port, p.logs / "api.log")
        stack.wait_for(lambda: stack.live_workers(redis_server.url(DB)) == 2 and stack.api_ready(p.base), 120,
                       "two hosts' workers and the API")
        yield p
    finally:
        for proc in [*p.hosts.values(), *([p.api] if p.api else [])]:
            proc.stop()
        proxy.close()


def _answered_by_both(pool: Pool) -> None:
    """Queries go to whichever host is free: both answer, alike (one store, one answer)."""
    url = pool.env["host-b"]["IMGSEARCH_REDIS_URL"]
    store = JobStore(connect(url, 5), ttl=600, maxlen=100)
    live = Live(pool.base, pool.env["host-a"], pool.logs)
    answers: dict[str, list[list[str]]] = {}
    deadline = stack.time.monotonic() + 120
    while len(answers) < 2 and stack.time.monotonic() < deadline:
        ids = [live.submit("a red circle", limit=5) for _ in range(4)]
        for job_id in ids:
            job = live.wait(job_id)
            assert job["status"] == "done", job
            record = store.load(job_id)
            host = (record.worker or "").split(":")[0] if record else ""
            answers.setdefault(host, []).append([r["id"] for r in job["results"]])
    assert set(answers) == {"host-a", "host-b"}, answers
    first = answers["host-a"][0]
    assert len(first) == 5 and all(r == first for rs in answers.values() for r in rs)


def test_a_run_whose_coordinator_dies_is_resumed_by_another(pool: Pool, tmp_path, pinecone_standin,  # type: ignore[no-untyped-def]
                                                            engines) -> None:
    """The coordinator (`imgsearch ingest` on a third host) is killed with its batches out; the workers go on;
    the next coordinator, on another host, takes the lease once it expires, adopts the run and completes it."""
    from standins.reddit import picture

    folder = tmp_path / "more"
    folder.mkdir()
    for i in range(12):
        (folder / f"more{i:02d}.jpg").write_bytes(picture(1000 + i))
    env = {**pool.env["host-b"], "IMGSEARCH_HOST_NAME": "coordinator-1", "IMGSEARCH_INGEST_LEASE_TTL_S": "2"}
    watch = Ledger(pool.ledger_url)
    pool.proxy.set("delay", delay_s=3)
    first = stack._spawn("coordinator", [sys.executable, "-m", "cli.main", "ingest", str(folder), "--source", "folder"],
                         env, pool.logs / "coordinator-1.log")

    def started() -> list[dict[str, Any]]:
        return [run for run in watch.runs() if run["finished"] is None and run["source"].endswith(str(folder))]

    try:
        stack.wait_for(lambda: bool(started()) and started()[0]["cursor"] is not None, 60, "the run to be planned")
        first.kill()
    finally:
        pool.proxy.set("pass")
        first.stop()
    run_id = started()[0]["id"]
    assert watch.outstanding(run_id)  # its batches were still out
    s = pool.settings().model_copy(update={"host_name": "coordinator-2", "ingest_lease_ttl_s": 2.0})
    report = None
    deadline = stack.time.monotonic() + 30
    while report is None:  # the dead coordinator's lease runs out within 2 s; until then: ingest_running
        try:
            report = run_fanout(s, FolderSource(folder), batch_sender(s),
                                 f"{engines.image.version}|{engines.reranker.version}")
        except Unavailable as exc:
            assert exc.code == "ingest_running" and stack.time.monotonic() < deadline
            stack.time.sleep(0.2)
    assert report.run_id == run_id and report.resumed
    assert watch.counts(run_id) == {INGESTED: 12} and not report.failed
    assert sum(1 for k in pinecone_standin.data[NS] if k.startswith("more")) == 12
    watch.close()
    _answered_by_both(pool)


def test_a_run_spreads_over_both_hosts_and_survives_losing_one(pool: Pool, demo_images, engines,  # type: ignore[no-untyped-def]
                                                                pinecone_standin) -> None:
    s = pool.settings()
    versions = ModelVersions.of(engines.image, engines.reranker)
    watch = Ledger(pool.ledger_url)
    pool.proxy.set("delay", delay_s=3)  # every upsert stalls: batches are held while the test looks
    out: dict[str, Any] = {}

    def coordinate() -> None:
        try:
            out["report"] = run_fanout(s, FolderSource(demo_images), batch_sender(s), versions)
        except BaseException as exc:  # noqa: BLE001 - the test thread reports it
            out["error"] = exc

    coordinator = threading.Thread(target=coordinate, daemon=True)
    coordinator.start()

    def claimed() -> int:
        return sum(1 for run in watch.runs() if run["finished"] is None
                   for o in watch.outstanding(run["id"]) if o["status"] == CLAIMED and not o["expired"])

    # one thread per host, a batch each: two batches claimed means both hosts hold one
    stack.wait_for(lambda: claimed() == 2 * BATCH, 60, "both hosts to hold a batch")
    pool.hosts["host-a"].kill()  # a machine lost, its batch in hand
    pool.proxy.set("pass")
    coordinator.join(180)
    assert not coordinator.is_alive() and "error" not in out, out
    report = out["report"]
    assert report.ingested == 48 and not report.failed, report.summary()
    assert watch.counts(report.run_id) == {INGESTED: 48}
    ids = {p.id for page in FolderSource(demo_images).pages() for p in page.posts}
    # this module's namespace only: the stand-in is the session's, and other tests wrote the same ids elsewhere
    vectors = {k: n for k, n in pinecone_standin.upserts.items()
               if k.split("/", 1)[0] == NS and k.split("/", 1)[1] in ids}
    assert len(ids) == 48 and len(vectors) == 48 and ids <= set(pinecone_standin.data[NS])  # nothing lost
    redone = [k for k, n in vectors.items() if n > 1]
    assert len(redone) <= BATCH  # written again: at most the lost host's batch (its writes are idempotent)
    claims = [(watch.status(k.split("/", 1)[1]) or {}).get("claims") for k in vectors]
    assert sorted(claims).count(2) == BATCH and claims.count(1) == 48 - BATCH  # the lost batch, claimed again
    watch.close()


def test_a_batch_that_keeps_failing_is_recorded_with_its_reason_and_the_run_ends(pool: Pool, tmp_path,  # type: ignore[no-untyped-def]
                                                                                  engines) -> None:
    """The vector store refuses every write (503): each claim of the batch gives it back with why, the
    coordinator sends it again, and after IMGSEARCH_INGEST_BATCH_TRIES claims records its items failed with the
    last reason; the run ends instead of waiting forever."""
    from standins.reddit import picture

    folder = tmp_path / "doomed"
    folder.mkdir()
    for i in range(BATCH):
        (folder / f"doomed{i}.jpg").write_bytes(picture(2000 + i))
    s = pool.settings()
    pool.proxy.set("status")
    try:
        report = run_fanout(s, FolderSource(folder), batch_sender(s), ModelVersions.of(engines.image, engines.reranker))
    finally:
        pool.proxy.set("pass")
    assert report.ingested == 0 and sorted(report.failed) == [f"doomed{i}" for i in range(BATCH)]
    why = report.failed["doomed0"]
    assert why.startswith(f"gave up after {s.ingest_batch_tries} claims: ") and "Unavailable" in why, why

"""Ingest spread over the worker pool.

The coordinator (``FanoutRun``) only lists, plans and checkpoints: it screens each page, skips what the ledger
has settled, records the rest as planned (with the post), sends them in batches of ids to the embed queue, and
moves the checkpoint past the page. Then it watches the ledger until the run's items are all settled, sending
again the items whose worker died (their claim expired) or gave them back, and recording as failed, with the
last reason a worker gave, those that used up ``ingest_batch_tries`` claims. A coordinator that dies leaves its
run unfinished: the next one (on any host, once the lease is free) adopts its outstanding items, sends them
again, and lists on from the checkpoint.

A worker (``ingest_batch``) claims a batch's items in the ledger, then downloads, checks near-duplicates
against the shared index, embeds and writes them exactly as a one-box run does (``items.ItemStages``), and
settles them under its claim. A message delivered twice, or a batch sent again while its first worker still
runs, finds the items claimed or settled and does nothing; a worker whose claim expired has its late marks
refused. Every write is a put or upsert keyed by post id (and the model version in the feature key), so an item
redone after a death leaves one copy.

The coordinator sends through a ``dispatch`` callable (the edge's Celery client): nothing here imports Celery.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidRequest
from pipeline.ids import is_post_id
from pipeline.ingest.items import Embedders, Item, ItemStages
from pipeline.ingest.ledger import CLAIMED, DUPLICATE, INGESTED, PLANNED, REJECTED, Ledger, LedgerRow
from pipeline.ingest.report import IngestReport
from pipeline.ingest.run import screen
from pipeline.ingest.sources import IMAGE_EXTS, Post, Source
from pipeline.ingest.urls import Refused, check_form, shown
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.settings import IngestSettings
from pipeline.versions import ModelVersions

log = logging.getLogger(__name__)

Dispatch = Callable[[dict[str, Any]], None]
# the coordinator plans the next page only while fewer batches than this are out: the queue stays bounded,
# whatever the size of the listing
MAX_OUTSTANDING_BATCHES = 64


def post_json(post: Post) -> str:
    d = asdict(post)
    d["file"] = str(post.file) if post.file is not None else None
    return json.dumps(d)


def post_from_json(raw: str, settings: IngestSettings, source: str, folder: str | None = None) -> Post:
    """A planned post read back from the ledger, checked as a fresh one from ``source`` would be (the ledger is
    shared, so what it holds is input too): a folder post's ``file`` is a picture directly inside ``folder`` (the
    batch's, from the coordinator's task; else ``ingest_folder``), as the folder source lists them; any other
    source's post has no file, and its URL passes
    the listing's check (scheme, host, port). InvalidRequest says what is wrong."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or not is_post_id(d.get("id")):
            raise ValueError("no valid post id")
        file = d.get("file")
        if source == "folder":
            root = folder or settings.ingest_folder
            if not isinstance(file, str) or root is None:
                raise ValueError("a folder post without a file, or no folder to read it from")
            path = Path(file)
            if path.parent.resolve() != Path(root).resolve() or path.suffix.lower() not in IMAGE_EXTS:
                raise ValueError(f"file {shown(file)} is not a picture directly inside the ingest folder")
            d["file"] = path
        else:
            if file is not None:
                raise ValueError(f"a {source} post names a file ({shown(str(file))})")
            check_form(str(d.get("url")), settings.fetch.image_hosts, settings.fetch.allow_ports)
        return Post(**d)
    except (ValueError, TypeError, Refused) as exc:  # json's errors are ValueErrors; unknown fields TypeErrors
        raise InvalidRequest(f"a planned post in the ledger is refused: {exc}") from None


@dataclass(frozen=True)
class BatchTask:
    """What goes on the embed queue: ids only (the posts wait in the ledger), the models to use, and for the
    folder source its folder (what a post read back from the ledger may name a file in). On the queue it is a
    JSON object of these fields, ``versions`` as its text (``image|reranker``)."""

    run_id: str
    source: str
    ids: list[str]
    versions: ModelVersions
    folder: str | None = None

    def payload(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "source": self.source, "ids": list(self.ids), "versions": str(self.versions),
                "folder": self.folder}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> BatchTask:
        """The task a ``payload()`` was made from (its fields' types checked by the edge that received it)."""
        versions = ModelVersions.parse(payload["versions"])
        if versions is None:
            raise InvalidRequest(f"a batch names no models: versions {shown(str(payload['versions']))}")
        return cls(payload["run_id"], payload["source"], list(payload["ids"]), versions, payload.get("folder"))


class FanoutRun:
    """The coordinator of one fanned-out run (see the module's docstring)."""

    def __init__(self, settings: IngestSettings, source: Source, ledger: Ledger, dispatch: Dispatch,
                 versions: ModelVersions, *, poll_s: float = 0.25,
                 on_progress: Callable[[IngestReport], None] | None = None) -> None:
        self.s, self.source, self.ledger, self.dispatch, self.versions = settings, source, ledger, dispatch, versions
        self.poll_s, self.on_progress = poll_s, on_progress
        folder = getattr(source, "folder", None)  # the folder source's: the one place its posts' files may be
        self.folder = str(Path(folder).resolve()) if folder is not None else None
        self.report = IngestReport(source=source.key())
        self.sent: dict[str, tuple[tuple[str, int], float]] = {}  # id -> (its state, when) when last sent

    def run(self, fresh: bool = False) -> IngestReport:
        t0 = time.perf_counter()
        self.ledger.lock()
        try:
            run_id, cursor = self.ledger.open_run(self.source.key(), fresh)
            self.report.run_id, self.report.resumed = run_id, cursor is not None
            adopted = self.ledger.adopt(run_id)
            if adopted:
                log.info("ingest %s: adopted %d outstanding items of an earlier run", run_id, adopted)
            self._resend(run_id, everything=True)  # a resumed run: its batches may be gone with their worker
            for page in self.source.pages(cursor):
                self.ledger.hold()
                self._wait(run_id, until=MAX_OUTSTANDING_BATCHES * self.s.ingest_batch_size)
                self._plan_page(run_id, page)
            self._wait(run_id)
            counts = self.ledger.counts(run_id)
            self.report.ingested = counts.get(INGESTED, 0)
            self.report.duplicates = counts.get(DUPLICATE, 0)
            self.report.failed = self.ledger.failures(run_id)
            self.report.source_failures = dict(self.source.failures)
            self.report.wall_s = round(time.perf_counter() - t0, 3)
            self.ledger.finish(run_id, self.report.as_dict())
            log.info("ingest (fanned out) %s", self.report.summary())
            return self.report
        finally:
            self.ledger.unlock()

    def _plan_page(self, run_id: str, page: Any) -> None:
        self.report.listed += page.listed
        posts, rejected = screen(page)
        if rejected:
            self.report.rejected += len(rejected)
            self.ledger.record([LedgerRow(pid, self.source.name, REJECTED, why, True) for pid, why in rejected.items()],
                               str(self.versions), run_id)
        settled = self.ledger.settled([p.id for p in posts], str(self.versions), self.s.ingest_max_attempts,
                                      outstanding=True)
        self.report.skipped += len(settled)
        todo = list({p.id: p for p in posts if p.id not in settled}.values())
        # planned in the ledger before anything is sent: a message lost after this is sent again from there
        self.ledger.plan(run_id, self.source.name, [(p.id, post_json(p)) for p in todo])
        self._send(run_id, [(p.id, (PLANNED, 0)) for p in todo])
        self.ledger.checkpoint(run_id, page.cursor)

    def _send(self, run_id: str, items: Sequence[tuple[str, tuple[str, int]]]) -> None:
        """Send ``(id, state)`` items in batches; ``state`` (status, claims had) is what each was sent in."""
        step, now = self.s.ingest_batch_size, time.monotonic()
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            self.dispatch(BatchTask(run_id, self.source.name, [pid for pid, _ in chunk], self.versions,
                                    self.folder).payload())
            for pid, state in chunk:
                self.sent[pid] = (state, now)

    def _resend(self, run_id: str, everything: bool = False) -> int:
        """Send again what no live worker holds: items given back, whose claim expired, or sent longer ago than
        a claim lasts (a lost message); with ``everything``, every one. Items out of claims are recorded
        failed. Returns how many are still outstanding."""
        outstanding = self.ledger.outstanding(run_id)
        again: list[tuple[str, tuple[str, int]]] = []
        spent: list[str] = []
        now = time.monotonic()
        for item in outstanding:
            if item["status"] == CLAIMED and not item["expired"]:
                continue  # a live worker holds it
            if item["tries"] >= self.s.ingest_batch_tries:
                spent.append(item["id"])
                continue
            state = (item["status"], item["tries"])
            last = self.sent.get(item["id"])
            if everything or last is None or last[0] != state or now - last[1] > self.s.ingest_claim_ttl_s:
                again.append((item["id"], state))
        if spent:
            self.ledger.give_up(run_id, self.source.name, spent, self.s.ingest_batch_tries)
            log.warning("ingest %s: %d items failed every claim", run_id, len(spent))
        if again:
            log.info("ingest %s: sending %d items (again)", run_id, len(again))
            self._send(run_id, again)
        return len(outstanding) - len(spent)

    def _wait(self, run_id: str, until: int = 0) -> None:
        """Until at most ``until`` items of the run are outstanding (the workers write the ledger; this only
        reads it, and sends again what no live worker holds)."""
        while self._resend(run_id) > until:
            self.ledger.hold()
            if self.on_progress is not None:
                counts = self.ledger.counts(run_id)
                self.report.ingested, self.report.duplicates = counts.get(INGESTED, 0), counts.get(DUPLICATE, 0)
                self.on_progress(self.report)
            time.sleep(self.poll_s)


def ingest_batch(settings: IngestSettings, task: BatchTask, image_encoder: ImageEncoder, reranker: Reranker,
                 vectors: VectorStore, blobs: BlobStore, ledger: Ledger, *, namespace: str | None = None,
                 embedders: Sequence[tuple[ImageEncoder, Reranker]] = ()) -> dict[str, Any]:
    """One batch on a worker: claim, then download, dedup, embed and write what was claimed, and settle it
    under the claim. What could not be finished is given back with why (the coordinator sends it again)."""
    models = Embedders(image_encoder, reranker, embedders)
    if models.versions != task.versions:
        # a worker on other models would write vectors the run's others cannot be compared with
        raise InvalidRequest(f"this worker runs {models.versions}, the run {task.versions}")
    token, claimed = ledger.claim(task.run_id, task.ids, settings.ingest_claim_ttl_s, settings.ingest_batch_tries)
    if not claimed:
        return {"claimed": 0}
    posts = _read_back(settings, task, claimed, ledger, token)
    report = IngestReport(run_id=task.run_id, source=task.source)
    try:
        with ItemStages(settings, models, vectors, blobs, ledger, source=task.source, run_id=task.run_id,
                        report=report, namespace=settings.namespace if namespace is None else namespace,
                        claim=token) as stages:
            stages.run([Item(post) for post in posts])
    except Exception as exc:
        ledger.release(token, list(claimed), f"{type(exc).__name__}: {exc}")
        log.warning("ingest batch of %d (run %s) given back: %s: %s", len(claimed), task.run_id,
                    type(exc).__name__, exc)
        raise
    return {"claimed": len(claimed), "ingested": report.ingested, "duplicates": report.duplicates}


def _read_back(settings: IngestSettings, task: BatchTask, claimed: dict[str, str], ledger: Ledger,
               token: str) -> list[Post]:
    """The claimed posts, as read back from the ledger; those refused are settled as a fresh input's refusal
    would be: permanent, never fetched or read."""
    posts, refused = [], []
    for pid, raw in claimed.items():
        try:
            posts.append(post_from_json(raw, settings, task.source, task.folder))
        except InvalidRequest as exc:
            refused.append(LedgerRow(pid, task.source, REJECTED, str(exc), True))
    if refused:
        log.warning("ingest batch (run %s): %d planned post(s) refused as read back", task.run_id, len(refused))
        ledger.record(refused, str(task.versions), task.run_id, claim=token)
    return posts


def run_fanout(settings: IngestSettings, source: Source, dispatch: Dispatch, models: ModelVersions, *,
               fresh: bool = False, on_progress: Callable[[IngestReport], None] | None = None) -> IngestReport:
    """One fanned-out run on the ledger the settings name (see ``FanoutRun``), embedded by ``models``."""
    ledger = Ledger.open(settings)
    try:
        return FanoutRun(settings, source, ledger, dispatch, models, on_progress=on_progress).run(fresh)
    finally:
        ledger.close()

"""One ingest run on one box: list -> skip settled ids (before any download) -> the item stages (download,
near-duplicate check, embed, write, settle: ``items.ItemStages``) -> checkpoint the pages that are wholly done.

Listing and downloads run ahead of the embed stage in other threads, so the embed stage (the costly one)
rarely waits. Every per-item failure is recorded with its reason and never stops the run."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pipeline.cache import FeatureCache, ResultCache
from pipeline.ids import check_post_id, describe_bad_id, is_post_id, refused_key
from pipeline.ingest.images import Prepared
from pipeline.ingest.items import Embedders, Item, ItemStages, Ready
from pipeline.ingest.ledger import REJECTED, TAKEN_DOWN, Ledger, LedgerRow
from pipeline.ingest.report import IngestReport
from pipeline.ingest.sources import Page, Post, Source
from pipeline.layout import feature_key, image_key, old_thumb_key, post_key, thumbs_prefix, tombstone_key
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.settings import IngestSettings

log = logging.getLogger(__name__)

# what the listing thread tells the run's thread, in order
@dataclass(frozen=True)
class _Downloading:  # an item whose download started
    item: Item
    download: Future[Prepared]


@dataclass(frozen=True)
class _Refused:  # a page's entries that are no image post, by a key safe to store, with why
    rejected: dict[str, str]


@dataclass(frozen=True)
class _PageListed:  # every item of the page was sent; the checkpoint past it is ``cursor``
    page: int
    cursor: dict[str, Any]


@dataclass(frozen=True)
class _Listed:  # the listing ended
    pass


@dataclass(frozen=True)
class _ListingFailed:  # the listing raised: the run stops, unfinished, so the next one resumes it
    error: BaseException


_Message = _Downloading | _Refused | _PageListed | _Listed | _ListingFailed


class _Pages:
    """Which pages are wholly settled, in order: the checkpoint moves past a page only when all its items
    (and all earlier pages') are recorded in the ledger."""

    def __init__(self) -> None:
        self.open: dict[int, list[Any]] = {}  # seq -> [outstanding items, cursor, listing complete]
        self.cursor: dict[str, Any] | None = None

    def add_item(self, seq: int) -> None:
        self.open.setdefault(seq, [0, None, False])[0] += 1

    def close(self, seq: int, cursor: dict[str, Any]) -> None:
        entry = self.open.setdefault(seq, [0, None, False])
        entry[1], entry[2] = cursor, True

    def settle(self, seq: int) -> None:
        self.open[seq][0] -= 1

    def advance(self) -> bool:
        moved = False
        for seq in sorted(self.open):
            outstanding, cursor, complete = self.open[seq]
            if outstanding or not complete:
                break
            self.cursor = cursor
            del self.open[seq]
            moved = True
        return moved


class IngestRun:
    """One run on one box: a thread lists the source, skips what the ledger settled and starts downloads; the
    run's thread takes the downloads through ``ItemStages`` a batch at a time and checkpoints past each page
    whose items are all settled."""

    def __init__(self, settings: IngestSettings, source: Source, image_encoder: ImageEncoder, reranker: Reranker,
                 vectors: VectorStore, blobs: BlobStore, ledger: Ledger, *, namespace: str = "",
                 on_progress: Callable[[IngestReport], None] | None = None,
                 embedders: Sequence[tuple[ImageEncoder, Reranker]] = ()) -> None:
        self.s, self.source, self.vectors, self.blobs, self.ledger = settings, source, vectors, blobs, ledger
        self.namespace, self.on_progress = namespace, on_progress
        self.models = Embedders(image_encoder, reranker, embedders)
        self.versions = str(self.models.versions)
        self.report = IngestReport(source=source.key())
        self.list_s = 0.0
        self.pages = _Pages()

    # --- the listing thread: list, skip, start downloads ---
    def _produce(self, cursor: dict[str, Any] | None, stages: ItemStages, out: queue.Queue[_Message]) -> None:
        try:
            pages = iter(self.source.pages(cursor))
            seq = 0
            while True:
                t0 = time.perf_counter()
                page = next(pages, None)
                self.list_s += time.perf_counter() - t0
                if page is None:
                    break
                self.report.listed += page.listed
                posts, rejected = screen(page)
                if rejected:
                    self.report.rejected += len(rejected)
                    out.put(_Refused(rejected))
                settled = self.ledger.settled([p.id for p in posts], self.versions, self.s.ingest_max_attempts)
                self.report.skipped += len(settled)
                seen: set[str] = set()
                for post in posts:
                    if post.id in settled or post.id in seen:
                        continue
                    seen.add(post.id)
                    out.put(_Downloading(Item(post, seq), stages.download(post)))  # blocks while the queue is full
                out.put(_PageListed(seq, page.cursor))
                seq += 1
            out.put(_Listed())
        except BaseException as exc:  # the run stops (unfinished, so the next one resumes it)
            out.put(_ListingFailed(exc))

    # --- the run's thread: the item stages, the checkpoint ---
    def run(self, fresh: bool = False) -> IngestReport:
        t_start = time.perf_counter()
        self.ledger.lock()
        try:
            run_id, cursor = self.ledger.open_run(self.source.key(), fresh)
            self.report.run_id, self.report.resumed = run_id, cursor is not None
            with ItemStages(self.s, self.models, self.vectors, self.blobs, self.ledger, source=self.source.name,
                            run_id=run_id, report=self.report, namespace=self.namespace,
                            on_settled=self._settled) as stages:
                self._consume(cursor, stages)
                t0 = time.perf_counter()
                self.vectors.save()
                stages.t["write"] += time.perf_counter() - t0
                self.report.failed = self.ledger.failures(run_id)
                self.report.source_failures = dict(self.source.failures)
                self._finish_timings(stages, t_start)
            self.ledger.finish(run_id, self.report.as_dict())
            log.info("ingest %s", self.report.summary())
            return self.report
        finally:
            self.ledger.unlock()

    def _consume(self, cursor: dict[str, Any] | None, stages: ItemStages) -> None:
        q: queue.Queue[_Message] = queue.Queue(maxsize=2 * self.s.ingest_batch_size + self.s.fetch.concurrency)
        producer = threading.Thread(target=self._produce, args=(cursor, stages, q), name="ingest-list", daemon=True)
        producer.start()
        batch: list[Ready] = []
        while True:
            match q.get():
                case _Downloading(item, download):
                    self.pages.add_item(item.page)
                    ready = stages.take(item, download)
                    if ready is not None:
                        batch.append(ready)
                    if len(batch) >= self.s.ingest_batch_size:
                        stages.embed_and_write(batch)
                        batch = []
                case _Refused(rejected):
                    self.ledger.record([LedgerRow(pid, self.source.name, REJECTED, why, True)
                                        for pid, why in rejected.items()], self.versions, stages.run_id)
                case _PageListed(page, page_cursor):
                    self.pages.close(page, page_cursor)
                    if not batch:
                        stages.flush()
                case _Listed():
                    break
                case _ListingFailed(error):
                    raise error
        if batch:
            stages.embed_and_write(batch)
        stages.flush()
        producer.join()

    def _settled(self, items: list[Item]) -> None:
        """Items recorded in the ledger: move the checkpoint past the pages that are wholly done."""
        for item in items:
            self.pages.settle(item.page)
        if self.pages.advance() and self.pages.cursor is not None:
            self.ledger.checkpoint(self.report.run_id, self.pages.cursor)
        if self.on_progress is not None:
            self.on_progress(self.report)

    def _finish_timings(self, stages: ItemStages, t_start: float) -> None:
        t = {"list": self.list_s, "download": stages.downloader.busy_s, "decode": stages.downloader.decode_s, **stages.t}
        self.report.stages = {k: round(v, 3) for k, v in t.items()}
        self.report.wall_s = round(time.perf_counter() - t_start, 3)


def screen(page: Page) -> tuple[list[Post], dict[str, str]]:
    """The page's posts whose ids are valid, and every refused entry by a key safe to store: a listing's id
    names keys, paths and rows only once it matches the post-id pattern."""
    rejected = {pid if is_post_id(pid) else refused_key(pid): why if is_post_id(pid) else describe_bad_id(pid)
                for pid, why in page.rejected.items()}
    posts = []
    for post in page.posts:
        if is_post_id(post.id):
            posts.append(post)
        else:
            rejected[refused_key(post.id)] = describe_bad_id(post.id)
    return posts, rejected


def run_ingest(settings: IngestSettings, source: Source, image_encoder: ImageEncoder, reranker: Reranker,
               vectors: VectorStore, blobs: BlobStore, *, ledger: Ledger | None = None, namespace: str | None = None,
               fresh: bool = False, on_progress: Callable[[IngestReport], None] | None = None,
               embedders: Sequence[tuple[ImageEncoder, Reranker]] = ()) -> IngestReport:
    own = ledger is None
    ledger = ledger or Ledger.open(settings)
    try:
        return IngestRun(settings, source, image_encoder, reranker, vectors, blobs, ledger,
                         namespace=settings.namespace if namespace is None else namespace,
                         on_progress=on_progress, embedders=embedders).run(fresh)
    finally:
        if own:
            ledger.close()


def takedown(post_id: str, vectors: VectorStore, blobs: BlobStore, ledger: Ledger, *, reranker_versions: Sequence[str] = (),
             namespace: str = "", feature_cache: FeatureCache | None = None,
             results: ResultCache | None = None, thumb_sizes: Sequence[int] = ()) -> dict[str, Any]:
    """Remove a post everywhere: its vector, its blobs (image, thumbnails, post, features of every model that made them),
    the Redis caches (its features; cached results that may hold it), and mark it taken down so no later
    ingest brings it back. Returns what was removed."""
    check_post_id(post_id)  # it names keys and a ledger row
    versions = set(reranker_versions)
    made_by = ledger.versions_of(post_id)
    if made_by is not None:
        versions.add(made_by.reranker)
    # the tombstone first: a thumbnail written from here on is refused or removed by its own writer, and one
    # written before is found by the listing below (every size, whichever API's settings made it)
    blobs.put(tombstone_key(post_id), json.dumps({"taken_down_at": time.time()}).encode())
    removed_vectors = vectors.delete(ids=[post_id], namespace=namespace)
    keys = [image_key(post_id, "jpg"), post_key(post_id)] + [feature_key(v, post_id) for v in sorted(versions)]
    keys += [old_thumb_key(post_id, n) for n in thumb_sizes]
    removed_blobs = []
    for key in keys:
        if blobs.exists(key):
            blobs.delete(key)
            removed_blobs.append(key)
    for key in sorted(blobs.keys_under(thumbs_prefix(post_id))):
        blobs.delete(key)
        removed_blobs.append(key)
    if feature_cache is not None:
        feature_cache.delete(post_id)
    if results is not None:
        results.clear()  # any cached answer may list the post; answers are minutes-lived, so drop them all
    vectors.save()
    ledger.record([LedgerRow(post_id, "admin", TAKEN_DOWN, "taken down", True)], "", "takedown")
    return {"id": post_id, "vectors": removed_vectors, "blobs": removed_blobs}

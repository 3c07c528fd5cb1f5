"""One ingest run: list -> skip settled ids (before any download) -> download and normalise (bounded, in
background threads) -> near-duplicate check -> embed in batches (SigLIP vector, BLIP vision features) ->
write blobs -> upsert vectors -> mark done in the ledger -> checkpoint the pages that are wholly done.

Listing and downloads run ahead of the embed stage in other threads, so the embed stage (the costly one)
rarely waits. Every per-item failure is recorded with its reason and never stops the run."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline import features as featcodec
from pipeline.cache import FeatureCache, ResultCache
from pipeline.errors import InvalidRequest, Unavailable
from pipeline.ids import check_post_id, describe_bad_id, is_post_id, refused_key
from pipeline.ingest.download import Downloader, FetchError
from pipeline.ingest.images import Prepared
from pipeline.ingest.ledger import DUPLICATE, FAILED, INGESTED, REJECTED, TAKEN_DOWN, Ledger
from pipeline.ingest.sources import Page, Post, Source
from pipeline.layout import feature_key, image_key, old_thumb_key, post_key, thumbs_prefix, tombstone_key
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.settings import IngestSettings

log = logging.getLogger(__name__)

VECTOR_FIELDS = ("subreddit", "title", "created_utc", "over_18", "score", "width", "height", "permalink")
STAGES = ("list", "download", "decode", "dedup", "embed", "write")


@dataclass
class IngestReport:
    run_id: str = ""
    source: str = ""
    resumed: bool = False
    listed: int = 0  # entries the source listed
    rejected: int = 0  # listed, but no image post (removed, a link, a video, ...)
    skipped: int = 0  # settled by an earlier run: ingested, duplicate, taken down, failed for good
    downloaded: int = 0
    duplicates: int = 0
    ingested: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # this run's failures: id -> why
    source_failures: dict[str, str] = field(default_factory=dict)  # e.g. a subreddit whose listing failed
    # seconds per stage: list, embed, write and dedup on the run's own threads; download and decode summed
    # over the download threads (they overlap the others); wall is the run's whole time
    stages: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.ingested / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3)}

    def summary(self) -> str:
        st = ", ".join(f"{k} {v:.1f}" for k, v in self.stages.items())
        return (f"run {self.run_id}{' (resumed)' if self.resumed else ''}: listed {self.listed}, rejected {self.rejected}, "
                f"skipped {self.skipped}, downloaded {self.downloaded}, duplicates {self.duplicates}, "
                f"failed {len(self.failed)}, ingested {self.ingested} in {self.wall_s:.1f} s "
                f"({self.images_per_s:.2f} images/s); seconds per stage: {st}")


@dataclass
class _Ready:
    post: Post
    page: int
    prepared: Prepared


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
    def __init__(self, settings: IngestSettings, source: Source, image_encoder: ImageEncoder, reranker: Reranker,
                 vectors: VectorStore, blobs: BlobStore, ledger: Ledger, *, namespace: str = "",
                 on_progress: Callable[[IngestReport], None] | None = None,
                 embedders: Sequence[tuple[ImageEncoder, Reranker]] = ()) -> None:
        self.s, self.source = settings, source
        self.image_encoder, self.reranker, self.vectors, self.blobs, self.ledger = (
            image_encoder, reranker, vectors, blobs, ledger)
        self.namespace = namespace
        self.on_progress = on_progress
        self.versions = f"{image_encoder.version}|{reranker.version}"
        # parallel embed streams (engines.registry.load_image_engines); by default the given engines alone
        self.embedders = list(embedders) or [(image_encoder, reranker)]
        if any(e.version != image_encoder.version or r.version != reranker.version for e, r in self.embedders):
            raise ValueError("every embed stream must run the same models as the run's engines")
        self._embed_pool = ThreadPoolExecutor(len(self.embedders), thread_name_prefix="embed")
        self.report = IngestReport(source=source.key())
        self.t = dict.fromkeys(STAGES, 0.0)
        self.pages = _Pages()
        self._pending: list[tuple[str, str, str, str, bool, bytes | None]] = []  # ledger rows not yet written
        self._pending_pages: list[int] = []
        self.claim = ""  # a fanned-out batch's claim: only what it still holds is settled (pipeline.ingest.fanout)

    # --- the producer: list, skip, start downloads ---
    def _produce(self, cursor: dict[str, Any] | None, downloader: Downloader, out: queue.Queue[Any]) -> None:
        try:
            pages = iter(self.source.pages(cursor))
            seq = 0
            while True:
                t0 = time.perf_counter()
                page = next(pages, None)
                self.t["list"] += time.perf_counter() - t0
                if page is None:
                    break
                self.report.listed += page.listed
                posts, rejected = screen(page)
                if rejected:
                    self.report.rejected += len(rejected)
                    out.put(("rejected", seq, rejected))
                ids = [p.id for p in posts]
                settled = self.ledger.settled(ids, self.versions, self.s.ingest_max_attempts)
                self.report.skipped += len(settled)
                seen: set[str] = set()
                for post in posts:
                    if post.id in settled or post.id in seen:
                        continue
                    seen.add(post.id)
                    out.put(("item", seq, post, downloader.submit(post)))  # blocks while the queue is full
                out.put(("page", seq, page.cursor))
                seq += 1
            out.put(("end",))
        except BaseException as exc:  # the run stops (unfinished, so the next one resumes it)
            out.put(("error", exc))

    # --- the consumer: dedup, embed, write ---
    def run(self, fresh: bool = False) -> IngestReport:
        t_start = time.perf_counter()
        self.ledger.lock()
        downloader = Downloader(self.s)
        writer = ThreadPoolExecutor(8, thread_name_prefix="blob-write")
        try:
            run_id, cursor = self.ledger.open_run(self.source.key(), fresh)
            self.report.run_id, self.report.resumed = run_id, cursor is not None
            q: queue.Queue[Any] = queue.Queue(maxsize=2 * self.s.ingest_batch_size + self.s.fetch.concurrency)
            producer = threading.Thread(target=self._produce, args=(cursor, downloader, q), name="ingest-list",
                                        daemon=True)
            producer.start()
            batch: list[_Ready] = []
            while True:
                msg = q.get()
                kind = msg[0]
                if kind == "item":
                    _, seq, post, fut = msg
                    self.pages.add_item(seq)
                    ready = self._take(seq, post, fut)
                    if ready is not None:
                        batch.append(ready)
                    if len(batch) >= self.s.ingest_batch_size:
                        self._embed_and_write(batch, writer)
                        batch = []
                elif kind == "rejected":
                    _, seq, rejected = msg
                    self.ledger.record([(pid, self.source.name, REJECTED, why, True, None)
                                        for pid, why in rejected.items()], self.versions, run_id)
                elif kind == "page":
                    self.pages.close(msg[1], msg[2])
                    if not batch:
                        self._flush(run_id)
                elif kind == "end":
                    break
                else:
                    raise msg[1]
            if batch:
                self._embed_and_write(batch, writer)
            self._flush(run_id)
            producer.join()
            t0 = time.perf_counter()
            self.vectors.save()
            self.t["write"] += time.perf_counter() - t0
            self.report.failed = self.ledger.failures(run_id)
            self.report.source_failures = dict(self.source.failures)
            self._finish_timings(downloader, t_start)
            self.ledger.finish(run_id, self.report.as_dict())
            log.info("ingest %s", self.report.summary())
            return self.report
        finally:
            downloader.close()
            writer.shutdown(wait=True)
            self._embed_pool.shutdown(wait=True)
            self.ledger.unlock()

    def ingest_posts(self, posts: Sequence[Post], run_id: str) -> None:
        """Given posts (a fanned-out batch, pipeline.ingest.fanout) through the same stages as a run's: download,
        near-duplicate check, embed, write, settled in the ledger (under ``self.claim``)."""
        self.report.run_id = run_id
        downloader = Downloader(self.s)
        writer = ThreadPoolExecutor(8, thread_name_prefix="blob-write")
        try:
            futures = [(post, downloader.submit(post)) for post in posts]
            ready = []
            for post, fut in futures:
                self.pages.add_item(0)
                r = self._take(0, post, fut)
                if r is not None:
                    ready.append(r)
            for i in range(0, len(ready), self.s.ingest_batch_size):
                self._embed_and_write(ready[i:i + self.s.ingest_batch_size], writer)
            self._flush(run_id)
        finally:
            downloader.close()
            writer.shutdown(wait=True)
            self._embed_pool.shutdown(wait=True)

    def _finish_timings(self, downloader: Downloader, t_start: float) -> None:
        self.t["download"], self.t["decode"] = downloader.busy_s, downloader.decode_s
        self.report.stages = {k: round(v, 3) for k, v in self.t.items()}
        self.report.wall_s = round(time.perf_counter() - t_start, 3)

    def _take(self, seq: int, post: Post, fut: Future[Prepared]) -> _Ready | None:
        """A finished download: a failure or a near-duplicate is settled at once; an image goes on to embed."""
        try:
            prepared = fut.result()
        except FetchError as exc:
            self._settle(seq, (post.id, self.source.name, FAILED, exc.reason, exc.permanent, None))
            return None
        except Exception as exc:  # anything else one item does is that item's failure, not the run's
            self._settle(seq, (post.id, self.source.name, FAILED, f"{type(exc).__name__}: {exc}", False, None))
            return None
        self.report.downloaded += 1
        if self.s.ingest_dedup == "phash":
            t0 = time.perf_counter()
            hit = self.ledger.near_duplicates([(post.id, prepared.phash)], self.s.ingest_phash_max_distance).get(post.id)
            self.t["dedup"] += time.perf_counter() - t0
            if hit is not None:
                self.report.duplicates += 1
                self._settle(seq, (post.id, self.source.name, DUPLICATE,
                                   f"near-duplicate of {hit[0]} ({hit[1]} bits differ)", True, prepared.phash))
                return None
        return _Ready(post, seq, prepared)

    def _settle(self, seq: int, row: tuple[str, str, str, str, bool, bytes | None]) -> None:
        self._pending.append(row)
        self._pending_pages.append(seq)

    def _flush(self, run_id: str) -> None:
        """Write the settled items to the ledger, then move the checkpoint past pages that are wholly done."""
        self.ledger.hold()
        if self._pending:
            self.ledger.record(self._pending, self.versions, run_id, claim=self.claim)
            for seq in self._pending_pages:
                self.pages.settle(seq)
            self._pending, self._pending_pages = [], []
        if self.pages.advance() and self.pages.cursor is not None:
            self.ledger.checkpoint(run_id, self.pages.cursor)
        if self.on_progress is not None:
            self.on_progress(self.report)

    def _spread(self, tower: int, images: list[Image.Image]) -> list[Any]:
        """One tower (0: SigLIP image, 1: BLIP vision) over ``images``, split across the embed streams, each
        calling its engine ``step`` images at a time; results in input order."""
        step = self.s.ingest_embed_batch or (1 if self.s.engines.device == "cpu" else max(1, len(images)))

        def run(pair: tuple[ImageEncoder, Reranker], imgs: list[Image.Image]) -> list[Any]:
            call = pair[0].encode_images if tower == 0 else pair[1].vision_features
            return [row for i in range(0, len(imgs), step) for row in call(imgs[i:i + step])]

        n = len(self.embedders)
        if n == 1 or len(images) == 1:
            return run(self.embedders[0], images)
        parts = [list(range(i, len(images), n)) for i in range(n)]
        futures = [(part, self._embed_pool.submit(run, self.embedders[i], [images[j] for j in part]))
                   for i, part in enumerate(parts) if part]
        out: list[Any] = [None] * len(images)
        for part, fut in futures:
            for j, row in zip(part, fut.result(), strict=True):
                out[j] = row
        return out

    def _embed(self, batch: list[_Ready]) -> tuple[list[_Ready], np.ndarray, list[Any]]:
        images = [r.prepared.image for r in batch]
        vecs = np.stack(self._spread(0, images))
        if self.s.ingest_dedup == "embedding":
            t0 = time.perf_counter()
            keep = self._new_by_embedding(batch, vecs)
            self.t["dedup"] += time.perf_counter() - t0
            batch, vecs, images = [batch[i] for i in keep], vecs[keep], [images[i] for i in keep]
        return batch, vecs, self._spread(1, images) if images else []

    def _new_by_embedding(self, batch: list[_Ready], vecs: np.ndarray) -> list[int]:
        keep: list[int] = []
        for i, r in enumerate(batch):
            best = self.vectors.query(vecs[i], 1, namespace=self.namespace)
            dup = (best[0].id, best[0].score) if best and best[0].score >= self.s.ingest_dedup_cosine else None
            for j in keep:  # and within the batch
                cos = float(vecs[i] @ vecs[j])
                if dup is None and cos >= self.s.ingest_dedup_cosine:
                    dup = (batch[j].post.id, cos)
            if dup is None or dup[0] == r.post.id:
                keep.append(i)
            else:
                self.report.duplicates += 1
                self._settle(r.page, (r.post.id, self.source.name, DUPLICATE,
                                      f"near-duplicate of {dup[0]} (cosine {dup[1]:.3f})", True, r.prepared.phash))
        return keep

    def _embed_and_write(self, batch: list[_Ready], writer: ThreadPoolExecutor) -> None:
        t0 = time.perf_counter()
        try:
            kept, vecs, feats = self._embed(batch)
        except Exception as exc:  # isolate the item that breaks a batch: one at a time, each failure its own
            if len(batch) == 1:
                r = batch[0]
                self._settle(r.page, (r.post.id, self.source.name, FAILED, f"embedding failed: {exc}", True,
                                      r.prepared.phash))
                return
            log.warning("a batch of %d failed to embed (%s); embedding one at a time", len(batch), exc)
            for r in batch:
                self._embed_and_write([r], writer)
            return
        t1 = time.perf_counter()
        self.t["embed"] += t1 - t0
        if kept:
            self._write_isolated(kept, vecs, feats, writer)
        self.t["write"] += time.perf_counter() - t1
        self._flush(self.report.run_id)

    def _write_isolated(self, batch: list[_Ready], vecs: np.ndarray, feats: Sequence[Any],
                        writer: ThreadPoolExecutor) -> None:
        """The batch's writes; if they fail, each item's on its own, so a failure is recorded for the item
        that caused it and the run goes on. A store that is down (Unavailable) stops the run instead: that is
        no item's fault, and the next run resumes from the checkpoint."""
        try:
            self._write(batch, vecs, feats, writer)
            return
        except Unavailable:
            if len(batch) == 1:
                raise
        except Exception as exc:
            if len(batch) == 1:
                r = batch[0]
                log.warning("ingest: writing %s failed: %s: %s", r.post.id, type(exc).__name__, exc)
                self._settle(r.page, (r.post.id, self.source.name, FAILED, f"write failed: {type(exc).__name__}: {exc}",
                                      isinstance(exc, InvalidRequest), r.prepared.phash))
                return
        for i in range(len(batch)):
            self._write_isolated(batch[i:i + 1], vecs[i:i + 1], feats[i:i + 1], writer)

    def _write(self, batch: list[_Ready], vecs: np.ndarray, feats: Sequence[Any], writer: ThreadPoolExecutor) -> None:
        """Blobs first, the vector last: a vector exists only once everything it points at does."""
        puts, rows = [], []
        for r, vec, feat in zip(batch, vecs, feats, strict=True):
            meta = {**r.post.metadata(), "width": r.prepared.width, "height": r.prepared.height}
            post_doc = {"id": r.post.id, **meta, "ingested_at": time.time(), "models": self.versions}
            puts += [(image_key(r.post.id, "jpg"), r.prepared.jpeg), (post_key(r.post.id), json.dumps(post_doc).encode()),
                     (feature_key(self.reranker.version, r.post.id), featcodec.encode(feat))]
            vmeta = {k: meta[k] for k in VECTOR_FIELDS if meta.get(k) not in (None, "")}
            vmeta["model_version"] = self.image_encoder.version
            rows.append((r.post.id, vec, vmeta))
        for fut in [writer.submit(self.blobs.put, key, data) for key, data in puts]:
            fut.result()
        self.vectors.upsert(rows, namespace=self.namespace)
        for r in batch:
            self._settle(r.page, (r.post.id, self.source.name, INGESTED, "", False, r.prepared.phash))
        self.report.ingested += len(batch)


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
    if "|" in made_by:
        versions.add(made_by.split("|", 1)[1])
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
    ledger.record([(post_id, "admin", TAKEN_DOWN, "taken down", True, None)], "", "takedown")
    return {"id": post_id, "vectors": removed_vectors, "blobs": removed_blobs}

"""One item's way through ingest: download and normalise -> near-duplicate check -> embed (SigLIP vector, BLIP
vision features) -> write blobs, then the vector -> settle in the ledger.

``ItemStages`` runs these stages for the one-box run (``run.IngestRun``, which lists, skips and checkpoints
around it) and for a fanned-out batch (``fanout.ingest_batch``, which claims its items first and settles them
under that claim) alike. Downloads run in background threads; embedding goes a batch at a time (the costly
stage). Every per-item failure is settled with its reason and never stops the other items."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import features as featcodec
from pipeline.errors import InvalidRequest, Unavailable
from pipeline.ingest.download import Downloader, FetchError
from pipeline.ingest.images import Prepared
from pipeline.ingest.ledger import DUPLICATE, FAILED, INGESTED, Ledger, LedgerRow
from pipeline.ingest.report import IngestReport
from pipeline.ingest.sources import Post
from pipeline.layout import feature_key, image_key, post_key
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.settings import IngestSettings
from pipeline.versions import ModelVersions

log = logging.getLogger(__name__)

VECTOR_FIELDS = ("subreddit", "title", "created_utc", "over_18", "score", "width", "height", "permalink")


@dataclass(frozen=True)
class Item:
    """A post on its way, and the listing page it came from: the one-box run moves its checkpoint past a page
    once every item of it is settled (a fanned-out batch is not paged: nothing reads its items' page)."""

    post: Post
    page: int = 0


@dataclass(frozen=True)
class Ready:
    """A downloaded item that is no near-duplicate by its hash: it goes on to embed."""

    item: Item
    prepared: Prepared


class Embedders:
    """The models an item is embedded by, over one or more parallel embed streams
    (``engines.registry.load_image_engines``; by default the given engines alone), each running the same models."""

    def __init__(self, image_encoder: ImageEncoder, reranker: Reranker,
                 streams: Sequence[tuple[ImageEncoder, Reranker]] = ()) -> None:
        self.image_encoder, self.reranker = image_encoder, reranker
        self.versions = ModelVersions.of(image_encoder, reranker)
        self.streams = list(streams) or [(image_encoder, reranker)]
        if any(ModelVersions.of(e, r) != self.versions for e, r in self.streams):
            raise ValueError("every embed stream must run the same models as the run's engines")
        self._pool = ThreadPoolExecutor(len(self.streams), thread_name_prefix="embed")  # threads start on use

    def spread(self, tower: int, images: list[Image.Image], step: int) -> list[Any]:
        """One tower (0: SigLIP image, 1: BLIP vision) over ``images``, split across the streams, each calling
        its engine ``step`` images at a time; results in input order."""

        def run(pair: tuple[ImageEncoder, Reranker], imgs: list[Image.Image]) -> list[Any]:
            call = pair[0].encode_images if tower == 0 else pair[1].vision_features
            return [row for i in range(0, len(imgs), step) for row in call(imgs[i:i + step])]

        n = len(self.streams)
        if n == 1 or len(images) == 1:
            return run(self.streams[0], images)
        parts = [list(range(i, len(images), n)) for i in range(n)]
        futures = [(part, self._pool.submit(run, self.streams[i], [images[j] for j in part]))
                   for i, part in enumerate(parts) if part]
        out: list[Any] = [None] * len(images)
        for part, fut in futures:
            for j, row in zip(part, fut.result(), strict=True):
                out[j] = row
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ItemStages:
    """The stages of ingest for items of one run (see the module's docstring). Settled items wait in memory and
    are written to the ledger by ``flush`` (after each embedded batch), under ``claim`` when one is given (only
    what the claim still holds changes); ``on_settled`` then hears which items were written."""

    def __init__(self, settings: IngestSettings, models: Embedders, vectors: VectorStore, blobs: BlobStore,
                 ledger: Ledger, *, source: str, run_id: str, report: IngestReport, namespace: str = "",
                 claim: str = "", on_settled: Callable[[list[Item]], None] | None = None) -> None:
        self.s, self.models, self.vectors, self.blobs, self.ledger = settings, models, vectors, blobs, ledger
        self.source, self.run_id, self.report, self.namespace, self.claim = source, run_id, report, namespace, claim
        self.on_settled = on_settled
        self.t = {"dedup": 0.0, "embed": 0.0, "write": 0.0}  # seconds, on the calling thread
        self.downloader = Downloader(settings)
        self._writer = ThreadPoolExecutor(8, thread_name_prefix="blob-write")
        self._pending: list[tuple[Item, LedgerRow]] = []  # settled, not yet in the ledger

    def __enter__(self) -> ItemStages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.downloader.close()
        self._writer.shutdown(wait=True)
        self.models.close()

    def run(self, items: Sequence[Item]) -> None:
        """Every stage for items given at once (a batch): all downloads start, then embed batch by batch."""
        futures = [(item, self.download(item.post)) for item in items]
        ready = [r for r in (self.take(item, fut) for item, fut in futures) if r is not None]
        for i in range(0, len(ready), self.s.ingest_batch_size):
            self.embed_and_write(ready[i:i + self.s.ingest_batch_size])
        self.flush()

    def download(self, post: Post) -> Future[Prepared]:
        return self.downloader.submit(post)

    def take(self, item: Item, fut: Future[Prepared]) -> Ready | None:
        """A finished download: a failure or a near-duplicate is settled at once; an image goes on to embed."""
        try:
            prepared = fut.result()
        except FetchError as exc:
            self.settle(item, FAILED, exc.reason, exc.permanent)
            return None
        except Exception as exc:  # anything else one item does is that item's failure, not the run's
            self.settle(item, FAILED, f"{type(exc).__name__}: {exc}")
            return None
        self.report.downloaded += 1
        if self.s.ingest_dedup == "phash":
            t0 = time.perf_counter()
            pid = item.post.id
            hit = self.ledger.near_duplicates([(pid, prepared.phash)], self.s.ingest_phash_max_distance).get(pid)
            self.t["dedup"] += time.perf_counter() - t0
            if hit is not None:
                self.report.duplicates += 1
                self.settle(item, DUPLICATE, f"near-duplicate of {hit[0]} ({hit[1]} bits differ)", True, prepared.phash)
                return None
        return Ready(item, prepared)

    def settle(self, item: Item, status: str, reason: str = "", permanent: bool = False,
               phash: bytes | None = None) -> None:
        self._pending.append((item, LedgerRow(item.post.id, self.source, status, reason, permanent, phash)))

    def flush(self) -> None:
        """Write the settled items to the ledger (unless this run lost its lease), then tell ``on_settled``."""
        self.ledger.hold()
        items = [item for item, _ in self._pending]
        if self._pending:
            self.ledger.record([row for _, row in self._pending], str(self.models.versions), self.run_id,
                               claim=self.claim)
            self._pending = []
        if self.on_settled is not None:
            self.on_settled(items)

    def embed_and_write(self, batch: list[Ready]) -> None:
        """Embed and write a batch, then flush; a batch that fails to embed is done again one item at a time, so
        the failure is settled for the item that caused it."""
        t0 = time.perf_counter()
        try:
            kept, vecs, feats = self._embed(batch)
        except Exception as exc:
            if len(batch) == 1:
                self.settle(batch[0].item, FAILED, f"embedding failed: {exc}", True, batch[0].prepared.phash)
                return
            log.warning("a batch of %d failed to embed (%s); embedding one at a time", len(batch), exc)
            for r in batch:
                self.embed_and_write([r])
            return
        t1 = time.perf_counter()
        self.t["embed"] += t1 - t0
        if kept:
            self._write_isolated(kept, vecs, feats)
        self.t["write"] += time.perf_counter() - t1
        self.flush()

    def _embed(self, batch: list[Ready]) -> tuple[list[Ready], np.ndarray, list[Any]]:
        images = [r.prepared.image for r in batch]
        step = self.s.ingest_embed_batch or (1 if self.s.engines.device == "cpu" else max(1, len(images)))
        vecs = np.stack(self.models.spread(0, images, step))
        if self.s.ingest_dedup == "embedding":
            t0 = time.perf_counter()
            keep = self._new_by_embedding(batch, vecs)
            self.t["dedup"] += time.perf_counter() - t0
            batch, vecs, images = [batch[i] for i in keep], vecs[keep], [images[i] for i in keep]
        return batch, vecs, self.models.spread(1, images, step) if images else []

    def _new_by_embedding(self, batch: list[Ready], vecs: np.ndarray) -> list[int]:
        keep: list[int] = []
        for i, r in enumerate(batch):
            best = self.vectors.query(vecs[i], 1, namespace=self.namespace)
            dup = (best[0].id, best[0].score) if best and best[0].score >= self.s.ingest_dedup_cosine else None
            for j in keep:  # and within the batch
                cos = float(vecs[i] @ vecs[j])
                if dup is None and cos >= self.s.ingest_dedup_cosine:
                    dup = (batch[j].item.post.id, cos)
            if dup is None or dup[0] == r.item.post.id:
                keep.append(i)
            else:
                self.report.duplicates += 1
                self.settle(r.item, DUPLICATE, f"near-duplicate of {dup[0]} (cosine {dup[1]:.3f})", True, r.prepared.phash)
        return keep

    def _write_isolated(self, batch: list[Ready], vecs: np.ndarray, feats: Sequence[Any]) -> None:
        """The batch's writes; if they fail, each item's on its own, so a failure is recorded for the item
        that caused it and the run goes on. A store that is down (Unavailable) stops the run instead: that is
        no item's fault, and the next run resumes from the checkpoint."""
        try:
            self._write(batch, vecs, feats)
            return
        except Unavailable:
            if len(batch) == 1:
                raise
        except Exception as exc:
            if len(batch) == 1:
                r = batch[0]
                log.warning("ingest: writing %s failed: %s: %s", r.item.post.id, type(exc).__name__, exc)
                self.settle(r.item, FAILED, f"write failed: {type(exc).__name__}: {exc}",
                            isinstance(exc, InvalidRequest), r.prepared.phash)
                return
        for i in range(len(batch)):
            self._write_isolated(batch[i:i + 1], vecs[i:i + 1], feats[i:i + 1])

    def _write(self, batch: list[Ready], vecs: np.ndarray, feats: Sequence[Any]) -> None:
        """Blobs first, the vector last: a vector exists only once everything it points at does."""
        versions = self.models.versions
        puts, rows = [], []
        for r, vec, feat in zip(batch, vecs, feats, strict=True):
            post = r.item.post
            meta = {**post.metadata(), "width": r.prepared.width, "height": r.prepared.height}
            post_doc = {"id": post.id, **meta, "ingested_at": time.time(), "models": str(versions)}
            puts += [(image_key(post.id, "jpg"), r.prepared.jpeg), (post_key(post.id), json.dumps(post_doc).encode()),
                     (feature_key(versions.reranker, post.id), featcodec.encode(feat))]
            vmeta = {k: meta[k] for k in VECTOR_FIELDS if meta.get(k) not in (None, "")}
            vmeta["model_version"] = versions.image
            rows.append((post.id, vec, vmeta))
        for fut in [self._writer.submit(self.blobs.put, key, data) for key, data in puts]:
            fut.result()
        self.vectors.upsert(rows, namespace=self.namespace)
        for r in batch:
            self.settle(r.item, INGESTED, "", False, r.prepared.phash)
        self.report.ingested += len(batch)

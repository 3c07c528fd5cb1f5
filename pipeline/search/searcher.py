"""The search stages and the Searcher that runs them: encode -> retrieve -> fetch -> rerank -> fuse.

A query is text, a stored post (``like``) or a picture (``image``). Each goes through the same stages; its plan
(``pipeline.search.plans``, picked once per query from its kind) says what differs: ``encode`` is the SigLIP text
tower, the post's stored vector (read from the vector store: no model runs) or the SigLIP image tower; an image
query's rerank is the cosine of BLIP's ITC image projections (the query's against each candidate's stored one; no
ITM, which needs text), its fused score that cosine.

The Searcher's threads (the vector store's calls, the feature fetches, the batchers) run until ``close``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipeline import filters
from pipeline.breaker import Breaker
from pipeline.cache import FeatureCache, LocalLRU, ResultCache
from pipeline.errors import Cancelled, DeadlineExceeded, NotFound, Unavailable
from pipeline.ids import reddit_path
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, TextEncoder, VectorStore
from pipeline.search import explain, image_query
from pipeline.search.batching import Active, Batcher
from pipeline.search.feature_source import FeatureSource
from pipeline.search.fusion import rank
from pipeline.search.plans import Plan, Query, Scores, plan_for
from pipeline.settings import WorkerSettings
from pipeline.stores.bundle import Stores
from pipeline.types import Job, Match, Result, SearchOutcome, SearchParams, Vector
from pipeline.versions import check_versions

log = logging.getLogger(__name__)


class _Clock:
    """Times each stage in milliseconds and enforces the job's deadline between stages."""

    def __init__(self, deadline: float | None, cancelled: Callable[[], bool] | None = None) -> None:
        self.deadline, self.cancelled = deadline, cancelled
        self.timings: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.deadline is not None and time.time() > self.deadline:
            raise DeadlineExceeded(f"the job's deadline passed before the {stage} stage")
        if self.cancelled is not None and self.cancelled():
            raise Cancelled(f"cancelled by the client before the {stage} stage")
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[stage] = round((time.perf_counter() - t0) * 1000, 3)


class Searcher:
    """Runs one query through the stages; the engines and stores it holds are loaded once per process.

    Features come from its feature source (the worker's LRU, then Redis, then the blob store); whole outcomes
    may come from the result cache.
    """

    def __init__(self, settings: WorkerSettings, text: TextEncoder, vectors: VectorStore, blobs: BlobStore,
                 reranker: Reranker, *, feature_cache: FeatureCache | None = None, results: ResultCache | None = None,
                 local: LocalLRU | None = None, fetch_threads: int = 8, image: ImageEncoder | None = None) -> None:
        self.settings = settings
        self.image = image  # SigLIP's image tower, for picture queries
        self.text, self.vectors, self.blobs, self.reranker = text, vectors, blobs, reranker
        self.feature_cache, self.results, self.local = feature_cache, results, local
        # vector store calls run here, so a job waits on a slow store no longer than its deadline
        self._store_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        self.breakers = {name: Breaker(name, settings.breaker_failures, settings.breaker_reset_s)
                         for name in ("vector_store", "blob_store")}
        self.features = FeatureSource(settings, blobs, self.breakers["blob_store"], feature_cache=feature_cache,
                                      local=local, threads=fetch_threads,
                                      prepare=getattr(reranker, "stored_form", None))
        # cross-query batching: the jobs this process runs at once share their model calls
        self.active = Active()
        self._encode: Batcher[str, Vector] | None = None
        self._rerank: Batcher[tuple[str, Sequence[NDArray[Any]]], tuple[NDArray[np.float32], NDArray[np.float32]]] | None = None
        if settings.batch_max > 1:
            wait = settings.batch_wait_ms / 1000
            self._encode = Batcher("encode", lambda qs: list(text.encode_text(list(qs))), max_items=settings.batch_max,
                                   wait_s=wait, active=self.active)
            self._rerank = Batcher("rerank", reranker.score_many, max_items=settings.batch_max, wait_s=wait,
                                   active=self.active)

    @classmethod
    def over(cls, settings: WorkerSettings, text: TextEncoder, reranker: Reranker, stores: Stores,
             image: ImageEncoder | None = None) -> Searcher:
        """A Searcher over the process's stores bundle (built once; ingest and takedown share it)."""
        return cls(settings, text, stores.vectors, stores.blobs, reranker, feature_cache=stores.feature_cache,
                   results=stores.results, local=stores.local, image=image)

    def close(self) -> None:
        """Stop this Searcher's threads (a worker process's shutdown): the batchers end once the calls they hold
        are answered; queued store calls and fetches are dropped. A search after this fails."""
        for batcher in (self._encode, self._rerank):
            if batcher is not None:
                batcher.close()
        self._store_pool.shutdown(wait=False, cancel_futures=True)
        self.features.close()

    def circuits(self) -> dict[str, str]:
        """Each store's circuit: closed, open or half-open."""
        return {name: b.state for name, b in self.breakers.items()}

    # --- stages ---
    def encode(self, query: str) -> Vector:
        return self._encode(query) if self._encode is not None else self.text.encode_text([query])[0]

    def encode_image(self, image: Image.Image) -> Vector:
        if self.image is None:
            raise Unavailable("this worker holds no image encoder", code="image_search_unavailable")
        return self.image.encode_images([image])[0]

    def _namespace(self, params: SearchParams) -> str:
        return params.namespace if params.namespace is not None else self.settings.namespace

    def lookup(self, post_id: str, params: SearchParams, deadline: float | None = None) -> Vector:
        """A stored post's vector (a ``like`` query's encode stage: no model runs); NotFound if it is not indexed."""
        found: dict[str, tuple[Vector, dict[str, Any]]] = self._vector_call(
            partial(self.vectors.fetch, [post_id], namespace=self._namespace(params)), deadline)
        if post_id not in found:
            raise NotFound(f"no post {post_id!r} in the index (taken down, not ingested, or another namespace)",
                           code="unknown_post")
        vector, metadata = found[post_id]
        check_versions([Match(id=post_id, score=1.0, metadata=metadata)], self.text.version, self._namespace(params))
        return np.asarray(vector, np.float32)

    def retrieve(self, vector: Vector, params: SearchParams, deadline: float | None = None) -> list[Match]:
        """The nearest candidates; within the deadline (the call is left behind if the store is slower), and
        refused at once while the vector store's circuit is open. A ``like`` query's own post is left out."""
        limit = params.limit or self.settings.limit
        top_k = min(1000, max(params.top_k or self.settings.top_k, params.offset + limit))
        namespace = self._namespace(params)
        call = partial(self.vectors.query, vector, top_k + (1 if params.like else 0),
                       filter=filters.for_search(params.filter), namespace=namespace)
        matches: list[Match] = self._vector_call(call, deadline)
        check_versions(matches, self.text.version, namespace)  # another model's vectors would rank at random
        return [m for m in matches if m.id != params.like][:top_k]

    def _vector_call(self, call: Callable[[], Any], deadline: float | None) -> Any:
        """A vector store call within the deadline, through its circuit breaker."""
        breaker = self.breakers["vector_store"]
        budget = None if deadline is None else max(0.0, deadline - time.time())
        with breaker.attempt():
            future = self._store_pool.submit(call)
            try:
                return future.result(timeout=budget)
            except FutureTimeout as exc:
                if budget is None or budget >= self.settings.store_timeout_s:  # it had its full chance: its fault
                    breaker.failure()
                raise DeadlineExceeded("the vector store did not answer within the job's deadline") from exc

    def fetch(self, ids: Sequence[str], counts: dict[str, int] | None = None,
              deadline: float | None = None) -> dict[str, NDArray[Any]]:
        """Stored BLIP features by id, from the feature source (see pipeline.search.feature_source)."""
        return self.features.fetch(self.reranker.version, ids, counts, deadline)

    def stored_features(self, ids: Sequence[str]) -> dict[str, NDArray[Any]]:
        """Stored BLIP features of this worker's reranker by id (what ``explain`` reads)."""
        return self.features.fetch(self.reranker.version, ids)

    def picture(self, data: bytes | None, sha256: str) -> Image.Image:
        """An image query's kept picture, decoded again with ingest's guards (``image_query.picture``)."""
        return image_query.picture(data, sha256, self.settings.fetch.max_pixels)

    def explain(self, params: SearchParams, results: Sequence[Result]) -> None:
        """``explain: true``: maps on the first results (``explain.explain_results``)."""
        explain.explain_results(params, results, self.reranker, self.stored_features)

    def explain_posts(self, job: Job, post_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The explanation of each of ``post_ids`` in ``job``'s results (``explain.explain_posts``)."""
        return explain.explain_posts(job, post_ids, self.reranker, self.stored_features)

    def rerank(self, query: str, feats: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        if self._rerank is not None:
            return self._rerank((query, feats))
        return self.reranker.score(query, feats)

    def rerank_image(self, query: NDArray[Any] | Image.Image, feats: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """Cosines between the query's ITC image projection and each candidate's: ``query`` is stored BLIP
        features (a ``like`` query's post) or a picture (its vision features computed here)."""
        feats_q = self.reranker.vision_features([query])[0] if isinstance(query, Image.Image) else query
        q = self.reranker.image_projection([feats_q])[0]
        return (self.reranker.image_projection(feats) @ q).astype(np.float32)

    def result(self, m: Match, score: float, itm: float | None = None, cosine: float | None = None) -> Result:
        md = m.metadata
        return Result(id=m.id, score=score, itm=itm, cosine=cosine, ann_score=m.score, title=md.get("title"),
                      subreddit=md.get("subreddit"), permalink=reddit_path(md.get("permalink")),
                      created_utc=md.get("created_utc"), image_url=self.settings.image_url.format(id=m.id), metadata=md)

    def fuse(self, candidates: list[Match], reranked: list[str], scores: Scores) -> list[Result]:
        """Reranked candidates by fused score, then the rest in ANN order (their score is the ANN score)."""
        by_id = {m.id: m for m in candidates}
        out = [self.result(by_id[reranked[i]], *scores.part(i)) for i in rank(scores.fused)]
        done = set(reranked)
        return out + [self.result(m, m.score) for m in candidates if m.id not in done]

    def warm_up(self, query: str = "a warm-up query") -> dict[str, float]:
        """One query through every stage (its result cached nowhere), so the first real query pays no lazy load
        (an index read from disk, a filter's bitmap, a store's connections, an engine's first run). Milliseconds
        per stage; a stage that fails here is logged and left to fail (or succeed) on a real query."""
        clock = _Clock(None)
        try:
            vector = clock.run("encode", self.encode, query)
            candidates = clock.run("retrieve", self.retrieve, vector, SearchParams(query=query))
            ids = [m.id for m in candidates[:self.settings.rerank_k]]
            feats = clock.run("fetch", self.fetch, ids) if ids else {}
            if feats:
                clock.run("rerank", self.rerank, query, list(feats.values()))
            if self.image is not None:  # a search by picture: the image towers' first run
                picture = Image.new("RGB", (64, 64), (128, 128, 128))
                clock.run("encode_image", self.encode_image, picture)
                if feats:
                    clock.run("rerank_image", self.rerank_image, picture, list(feats.values())[:1])
        except Exception as exc:  # noqa: BLE001 - a store down at start: the worker still serves, its circuit decides
            log.warning("warm-up stopped: %s: %s", type(exc).__name__, exc)
        return clock.timings

    # --- the whole query ---
    def search(self, params: SearchParams, *, deadline: float | None = None,
               on_candidates: Callable[[list[Match]], None] | None = None,
               cancelled: Callable[[], bool] | None = None, image: Image.Image | None = None,
               owner: str | None = None) -> SearchOutcome:
        """One query to its outcome; ``image``: the picture of an ``image`` query (``params.image`` names it);
        ``owner``: who asked (the job's key): the result cache answers each owner from its own entries only."""
        if params.image and image is None:
            raise ValueError("an image query needs its picture")
        with self.active.job():
            key = self._cache_key(params, owner)
            cached = self._cached(key, on_candidates)
            if cached is not None:
                return cached
            outcome = self._run(plan_for(params), Query(params, image, deadline), _Clock(deadline, cancelled),
                                on_candidates)
            if key is not None and self.results is not None and not outcome.not_reranked:
                self.results.put(key, outcome)  # a degraded answer is not worth keeping
            return outcome

    def _cache_key(self, params: SearchParams, owner: str | None) -> str | None:
        if self.results is None:
            return None
        s = self.settings
        return ResultCache.key(params.query, params.model_dump(exclude={"query"}),
                               [self.text.version, self.reranker.version, str(s.itm_weight), str(s.cosine_weight),
                                str(s.top_k), str(s.rerank_k)], owner)

    def _cached(self, key: str | None, on_candidates: Callable[[list[Match]], None] | None) -> SearchOutcome | None:
        t0 = time.perf_counter()
        cached = self.results.get(key) if key is not None and self.results is not None else None
        if cached is not None:
            if on_candidates is not None:
                on_candidates(cached.candidates)
            cached.timings = {"cache": round((time.perf_counter() - t0) * 1000, 3)}
            cached.stats = {"result_cache": 1}
        return cached

    def _run(self, plan: Plan, q: Query, clock: _Clock,
             on_candidates: Callable[[list[Match]], None] | None) -> SearchOutcome:
        """The stages, in the order every kind runs them; ``plan`` says what differs by kind."""
        params = q.params
        vector = clock.run("encode", plan.encode, self, q)
        candidates: list[Match] = clock.run("retrieve", self.retrieve, vector, params, q.deadline)
        if on_candidates is not None:
            on_candidates(candidates)
        wanted = params.candidates if params.candidates is not None else params.rerank_k
        rerank_k = 0 if not params.rerank else min(wanted if wanted is not None else self.settings.rerank_k,
                                                   len(candidates))
        to_rerank = [m.id for m in candidates[:rerank_k]]
        stats: dict[str, int] = {}
        ids = plan.wanted(q, to_rerank)
        feats = clock.run("fetch", self.fetch, ids, stats, q.deadline) if ids else {}
        against = plan.against(q, feats)
        reranked = [pid for pid in to_rerank if pid in feats] if against is not None else []
        scores = (clock.run("rerank", plan.score, self, against, [feats[pid] for pid in reranked])
                  if reranked else plan.none())
        ranked = clock.run("fuse", self.fuse, candidates, reranked, scores)
        if params.min_score is not None:
            ranked = [r for r in ranked if r.score >= params.min_score]
        limit = params.limit or self.settings.limit
        return SearchOutcome(results=ranked[params.offset:params.offset + limit], candidates=candidates,
                             timings=clock.timings, stats=stats,
                             not_reranked=[pid for pid in to_rerank if pid not in reranked])

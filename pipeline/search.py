"""The search stages and the Searcher that runs them: encode -> retrieve -> fetch -> rerank -> fuse."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline import features as featcodec
from pipeline.errors import DeadlineExceeded, StoreError
from pipeline.fusion import fuse, rank
from pipeline.protocols import BlobStore, Reranker, TextEncoder, VectorStore
from pipeline.settings import Settings
from pipeline.types import Match, Result, SearchOutcome, SearchParams, Vector

log = logging.getLogger(__name__)


def feature_key(reranker_version: str, post_id: str) -> str:
    return f"features/{reranker_version}/{post_id}"


def image_key(post_id: str, ext: str) -> str:
    return f"images/{post_id}.{ext}"


def post_key(post_id: str) -> str:
    return f"posts/{post_id}.json"


class _Clock:
    """Times each stage in milliseconds and enforces the job's deadline between stages."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.timings: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.deadline is not None and time.time() > self.deadline:
            raise DeadlineExceeded(f"the job's deadline passed before the {stage} stage")
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[stage] = round((time.perf_counter() - t0) * 1000, 3)


class Searcher:
    """Runs one query through the stages; the engines and stores it holds are loaded once per process."""

    def __init__(self, settings: Settings, text: TextEncoder, vectors: VectorStore, blobs: BlobStore,
                 reranker: Reranker, fetch_threads: int = 8) -> None:
        self.settings = settings
        self.text, self.vectors, self.blobs, self.reranker = text, vectors, blobs, reranker
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")

    # --- stages ---
    def encode(self, query: str) -> Vector:
        return self.text.encode_text([query])[0]

    def retrieve(self, vector: Vector, params: SearchParams) -> list[Match]:
        top_k = params.top_k or self.settings.top_k
        return self.vectors.query(vector, top_k, filter=params.filter,
                                  namespace=params.namespace if params.namespace is not None else self.settings.namespace)

    def fetch(self, ids: Sequence[str]) -> dict[str, NDArray[Any]]:
        """Stored BLIP features by id; ids whose features are missing or corrupt are left out."""

        def one(post_id: str) -> tuple[str, NDArray[Any] | None]:
            try:
                data = self.blobs.get(feature_key(self.reranker.version, post_id))
                return post_id, None if data is None else featcodec.decode(data)
            except StoreError as exc:
                log.warning("features of %s unusable: %s", post_id, exc)
                return post_id, None

        return {pid: arr for pid, arr in self._pool.map(one, ids) if arr is not None}

    def rerank(self, query: str, feats: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        return self.reranker.score(query, feats)

    def fuse(self, candidates: list[Match], reranked: list[str], itm: NDArray[np.float32],
             cosine: NDArray[np.float32], limit: int) -> list[Result]:
        """Reranked candidates by fused score, then the rest in ANN order (their score is the ANN score)."""
        by_id = {m.id: m for m in candidates}
        fused = fuse(itm, cosine, self.settings.itm_weight, self.settings.cosine_weight)
        out = [Result(id=reranked[i], score=float(fused[i]), itm=float(itm[i]), cosine=float(cosine[i]),
                      ann_score=by_id[reranked[i]].score, metadata=by_id[reranked[i]].metadata) for i in rank(fused)]
        done = set(reranked)
        out += [Result(id=m.id, score=m.score, ann_score=m.score, metadata=m.metadata) for m in candidates
                if m.id not in done]
        return out[:limit]

    # --- the whole query ---
    def search(self, params: SearchParams, *, deadline: float | None = None,
               on_candidates: Callable[[list[Match]], None] | None = None) -> SearchOutcome:
        clock = _Clock(deadline)
        vector = clock.run("encode", self.encode, params.query)
        candidates: list[Match] = clock.run("retrieve", self.retrieve, vector, params)
        if on_candidates is not None:
            on_candidates(candidates)
        rerank_k = min(params.rerank_k if params.rerank_k is not None else self.settings.rerank_k, len(candidates))
        to_rerank = [m.id for m in candidates[:rerank_k]]
        feats = clock.run("fetch", self.fetch, to_rerank)
        reranked = [pid for pid in to_rerank if pid in feats]
        itm, cosine = clock.run("rerank", self.rerank, params.query, [feats[pid] for pid in reranked])
        limit = params.limit or self.settings.limit
        results = clock.run("fuse", self.fuse, candidates, reranked, itm, cosine, limit)
        return SearchOutcome(results=results, candidates=candidates, timings=clock.timings,
                             not_reranked=[pid for pid in to_rerank if pid not in feats])

"""Where a candidate's BLIP vision features come from, closest first: this process's LRU, then Redis, then the
blob store (in parallel, bounded, under one deadline, behind the blob store's circuit breaker). What came from
further away is kept nearer for the next query."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from numpy.typing import NDArray

from pipeline import features as featcodec
from pipeline.breaker import Breaker
from pipeline.cache import FeatureCache, LocalLRU, decode_cached
from pipeline.errors import ImgSearchError
from pipeline.layout import feature_key
from pipeline.protocols import BlobStore
from pipeline.settings import WorkerSettings

log = logging.getLogger(__name__)


class FeatureSource:
    """``prepare``: what a decoded feature is turned into before it is kept in this process and handed out (the
    reranker's ``stored_form``: the dtype it computes in, so a query never converts its candidates)."""

    def __init__(self, settings: WorkerSettings, blobs: BlobStore, breaker: Breaker, *, feature_cache: FeatureCache | None = None,
                 local: LocalLRU | None = None, threads: int = 8,
                 prepare: Callable[[NDArray[Any]], NDArray[Any]] | None = None) -> None:
        self.settings, self.blobs, self.breaker = settings, blobs, breaker
        self.feature_cache, self.local = feature_cache, local
        self.prepare = prepare or (lambda arr: arr)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch")

    def _from_blob(self, version: str, post_id: str) -> tuple[NDArray[Any] | None, bytes | None, str | None]:
        try:
            data = self.breaker.call(self.blobs.get, feature_key(version, post_id))
            return (None, None, "missing") if data is None else (self.prepare(featcodec.decode(data)), data, None)
        except ImgSearchError as exc:  # missing, corrupt or unreachable: this candidate is not reranked
            return None, None, exc.code

    def fetch(self, version: str, ids: Sequence[str], counts: dict[str, int] | None = None,
              deadline: float | None = None) -> dict[str, NDArray[Any]]:
        """Features of ``version`` by id; ids whose features are missing, corrupt or late are left out (within
        ``fetch_timeout_s`` and the deadline; none is asked for while the blob store's circuit is open).
        ``counts`` gets how many came from each place (features_local, features_redis, features_blob)."""
        counts = counts if counts is not None else {}
        out: dict[str, NDArray[Any]] = {}
        rest = list(ids)
        if self.local is not None:
            for pid in ids:
                arr = self.local.get(f"{version}:{pid}")
                if arr is not None:
                    out[pid] = arr
            rest = [pid for pid in ids if pid not in out]
        counts["features_local"] = len(out)
        if rest and self.feature_cache is not None:
            for pid, data in self.feature_cache.get_many(version, rest).items():
                arr = decode_cached(data)
                if arr is not None:
                    arr = self.prepare(arr)
                    out[pid] = arr
                    if self.local is not None:
                        self.local.put(f"{version}:{pid}", arr)
            counts["features_redis"] = len(out) - counts["features_local"]
            rest = [pid for pid in rest if pid not in out]
        fresh: dict[str, bytes] = {}
        if rest and self.breaker.state == "open":
            log.warning("features of %d candidate(s) not fetched: the blob store's circuit is open", len(rest))
            rest = []
        if rest:
            timeout = self.settings.fetch_timeout_s
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.time()))
            futures = {self._pool.submit(self._from_blob, version, pid): pid for pid in rest}
            done, late = wait(futures, timeout=timeout)
            for fut in late:
                fut.cancel()
            if late and timeout >= self.settings.fetch_timeout_s:  # slow with its full time: counts once per query
                self.breaker.failure()
            failed: dict[str, int] = {"late": len(late)} if late else {}
            for fut in done:
                arr, raw, why = fut.result()
                if arr is not None and raw is not None:
                    out[futures[fut]] = arr
                    fresh[futures[fut]] = raw
                elif why:
                    failed[why] = failed.get(why, 0) + 1
            if failed:
                log.warning("features of %d of %d candidate(s) not fetched (%s)", sum(failed.values()), len(rest),
                            ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
        counts["features_blob"] = len(fresh)
        if fresh:
            if self.feature_cache is not None:
                self.feature_cache.put_many(version, fresh)
            if self.local is not None:
                for pid in fresh:
                    self.local.put(f"{version}:{pid}", out[pid])
        return out

    def close(self) -> None:
        """Stop the fetch threads (a worker process's shutdown); fetches not started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)

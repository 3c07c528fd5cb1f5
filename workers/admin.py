"""Admin actions shared by the command line and the worker task: take posts down everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.settings import Settings, get_settings


def takedown_posts(ids: Sequence[str], settings: Settings | None = None, searcher: Any = None) -> list[dict[str, Any]]:
    """Remove each post from the vector store, the blob store and the Redis caches, and mark it taken down in
    the ingest ledger so no later run brings it back. With a worker's ``searcher``, its stores and caches
    are used (and its in-process feature LRU forgets the post); otherwise they are made from settings."""
    from pipeline.cache import FeatureCache, ResultCache, cache_client
    from pipeline.ingest import Ledger, takedown
    from pipeline.stores import make_blob_store, make_vector_store

    s = settings or get_settings()
    versions: list[str] = []
    if searcher is not None:
        vectors, blobs = searcher.vectors, searcher.blobs
        versions.append(searcher.reranker.version)
        feature_cache, results = searcher.feature_cache, searcher.results
    else:
        vectors, blobs = make_vector_store(s), make_blob_store(s)
        try:
            from engines.blip import SETTING
            from engines.loading import resolve, version_of

            versions.append(version_of(resolve(s.blip_model, SETTING)))
        except Exception:  # the model is not here: the ledger still names the versions that made the post
            pass
        client = cache_client(s.redis_url)
        feature_cache = FeatureCache(client, s.cache_features_ttl_s, s.cache_features_max)
        results = ResultCache(client, s.cache_results_ttl_s)
    ledger = Ledger(s.ingest_dir)
    try:
        out = [takedown(pid, vectors, blobs, ledger, reranker_versions=versions, namespace=s.namespace,
                        feature_cache=feature_cache, results=results) for pid in ids]
    finally:
        ledger.close()
    local = getattr(searcher, "local", None)
    if local is not None:
        for pid in ids:
            local.discard_post(pid)
    return out

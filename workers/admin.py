"""Admin actions shared by the command line and the worker task: take posts down everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.settings import WorkerSettings, get_worker_settings
from pipeline.stores.bundle import Stores


def takedown_posts(ids: Sequence[str], settings: WorkerSettings | None = None, stores: Stores | None = None,
                   reranker_versions: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Remove each post from the vector store, the blob store and the Redis caches, and mark it taken down in
    the ingest ledger so no later run brings it back. With a worker's ``stores`` (and its reranker's version),
    those are used and its in-process feature LRU forgets the post; otherwise they are made from settings."""
    from pipeline.ingest import Ledger, takedown

    s = settings or get_worker_settings()
    versions = list(reranker_versions)
    if stores is None:
        stores = Stores.build(s, feature_cache=True)
        try:
            from engines.blip import SETTING
            from engines.loading import resolve, version_of

            versions.append(version_of(resolve(s.engines.blip_model, SETTING)))
        except Exception:  # the model is not here: the ledger still names the versions that made the post
            pass
    ledger = Ledger.open(s)
    try:
        out = [takedown(pid, stores.vectors, stores.blobs, ledger, reranker_versions=versions, namespace=s.namespace,
                        feature_cache=stores.feature_cache, results=stores.results,
                        thumb_sizes=s.thumbnail_sizes) for pid in ids]
    finally:
        ledger.close()
    for pid in ids:
        stores.forget(pid)
    return out

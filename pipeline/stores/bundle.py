"""The stores of one process, built once and shared by search, ingest and takedown: the vector store, the blob
store, and the caches in front of them (query results and features in Redis, features in this process)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.cache import FeatureCache, LocalLRU, ResultCache, cache_client
from pipeline.protocols import BlobStore, VectorStore
from pipeline.settings import WorkerSettings
from pipeline.stores import make_blob_store, make_vector_store


@dataclass
class Stores:
    vectors: VectorStore
    blobs: BlobStore
    feature_cache: FeatureCache | None = None  # Redis, in front of a remote blob store
    results: ResultCache | None = None  # Redis: whole outcomes of recent queries
    local: LocalLRU | None = None  # this process's features

    @classmethod
    def build(cls, settings: WorkerSettings, *, caches: bool = True, feature_cache: bool | None = None) -> Stores:
        """The stores named by ``settings``; ``caches``: with the Redis caches and the in-process LRU (a worker)
        or without (a one-off search); ``feature_cache``: the Redis feature cache even where this process
        would not read it (a takedown clears what other workers cached), None: as settings say."""
        vectors, blobs = make_vector_store(settings), make_blob_store(settings)
        if not caches:
            return cls(vectors, blobs)
        client = cache_client(settings.redis_url, sentinel_password=settings.redis_sentinel_password)
        return cls(vectors, blobs,
                   feature_cache=FeatureCache(client, settings.caches.features_ttl_s, settings.caches.features_max)
                   if (settings.feature_cache_on if feature_cache is None else feature_cache) else None,
                   results=ResultCache(client, settings.caches.results_ttl_s),
                   local=LocalLRU(settings.caches.local_mb << 20))

    def forget(self, post_id: str) -> None:
        """A taken-down post leaves this process's feature LRU (the Redis caches are cleared by takedown)."""
        if self.local is not None:
            self.local.discard_post(post_id)

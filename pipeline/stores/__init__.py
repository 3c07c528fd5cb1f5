"""Store adapters and the registries that pick one by its config string."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pipeline.protocols import BlobStore, VectorStore
from pipeline.settings import SharedSettings


def _local_vector(settings: SharedSettings) -> VectorStore:
    from pipeline.stores.local_vector import LocalVectorStore

    return LocalVectorStore(settings.vector_dir, nprobe=settings.local_nprobe)


def _local_blob(settings: SharedSettings) -> BlobStore:
    from pipeline.stores.local_blob import LocalBlobStore

    return LocalBlobStore(settings.blob_dir)


def _pinecone(settings: SharedSettings) -> VectorStore:
    from pipeline.errors import StoreError
    from pipeline.stores.pinecone_store import PineconeVectorStore

    if settings.pinecone_api_key is None:
        raise StoreError("VECTOR_STORE=pinecone needs PINECONE_API_KEY")
    return PineconeVectorStore(settings.pinecone_api_key.get_secret_value(), index_name=settings.pinecone_index_name,
                               host=settings.pinecone_host, timeout=settings.store_timeout_s,
                               retries=settings.store_retries)


def _gcs(settings: SharedSettings) -> BlobStore:
    from pipeline.errors import StoreError
    from pipeline.stores.gcs_blob import GcsBlobStore

    if not settings.gcs_bucket:
        raise StoreError("BLOB_STORE=gcs needs IMGSEARCH_GCS_BUCKET")
    return GcsBlobStore(settings.gcs_bucket, project=settings.google_cloud_project, prefix=settings.gcs_prefix,
                        timeout=settings.store_timeout_s)


VECTOR_STORES: dict[str, Callable[[SharedSettings], VectorStore]] = {"local": _local_vector, "pinecone": _pinecone}
BLOB_STORES: dict[str, Callable[[SharedSettings], BlobStore]] = {"local": _local_blob, "gcs": _gcs}


def _pick(registry: Mapping[str, Callable[[SharedSettings], object]], name: str, what: str) -> Callable[[SharedSettings], object]:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}") from None


def make_vector_store(settings: SharedSettings) -> VectorStore:
    return _pick(VECTOR_STORES, settings.vector_store, "vector store")(settings)  # type: ignore[return-value]


def make_blob_store(settings: SharedSettings) -> BlobStore:
    return _pick(BLOB_STORES, settings.blob_store, "blob store")(settings)  # type: ignore[return-value]

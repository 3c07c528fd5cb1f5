"""Store adapters and the registries that pick one by its config string."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pipeline.protocols import BlobStore, VectorStore
from pipeline.settings import Settings


def _local_vector(settings: Settings) -> VectorStore:
    from pipeline.stores.local_vector import LocalVectorStore

    return LocalVectorStore(settings.vector_dir)


def _local_blob(settings: Settings) -> BlobStore:
    from pipeline.stores.local_blob import LocalBlobStore

    return LocalBlobStore(settings.blob_dir)


VECTOR_STORES: dict[str, Callable[[Settings], VectorStore]] = {"local": _local_vector}
BLOB_STORES: dict[str, Callable[[Settings], BlobStore]] = {"local": _local_blob}


def _pick(registry: Mapping[str, Callable[[Settings], object]], name: str, what: str) -> Callable[[Settings], object]:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}") from None


def make_vector_store(settings: Settings) -> VectorStore:
    return _pick(VECTOR_STORES, settings.vector_store, "vector store")(settings)  # type: ignore[return-value]


def make_blob_store(settings: Settings) -> BlobStore:
    return _pick(BLOB_STORES, settings.blob_store, "blob store")(settings)  # type: ignore[return-value]

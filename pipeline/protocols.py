"""One Protocol per seam. Implementations are picked by a config string from a registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipeline.types import Match, Metadata, Vector


@runtime_checkable
class TextEncoder(Protocol):
    """SigLIP text side: a batch of strings in, L2-normalised float32 vectors out."""

    version: str
    dim: int

    def encode_text(self, texts: Sequence[str]) -> Vector: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """SigLIP image side: a batch of images in, L2-normalised float32 vectors out."""

    version: str
    dim: int

    def encode_images(self, images: Sequence[Image.Image]) -> Vector: ...


@runtime_checkable
class Reranker(Protocol):
    """BLIP ITM: vision features are computed once at ingest; at query time only the text side runs (an image
    query compares the stored features' ITC projections)."""

    version: str

    def vision_features(self, images: Sequence[Image.Image]) -> NDArray[np.float16]: ...

    def score(self, query: str, features: Sequence[NDArray[Any]]) -> tuple[NDArray[np.float32],
                                                                            NDArray[np.float32]]:
        """ITM match probabilities and ITC cosines, one of each per candidate."""
        ...

    def score_many(self, items: Sequence[tuple[str, Sequence[NDArray[Any]]]]) -> list[tuple[NDArray[np.float32],
                                                                                             NDArray[np.float32]]]:
        """``score`` for several queries at once (cross-query batching), one answer per item, in order."""
        ...

    def image_projection(self, features: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """The ITC image projections of vision features (one L2-normalised row each): what an image query's
        rerank compares (no text, so no ITM)."""
        ...


@runtime_checkable
class VectorStore(Protocol):
    def upsert(self, items: Sequence[tuple[str, Vector, Metadata]], namespace: str = "") -> int: ...

    def query(self, vector: Vector, top_k: int, filter: dict[str, Any] | None = None,
              namespace: str = "") -> list[Match]: ...

    def fetch(self, ids: Sequence[str], namespace: str = "") -> dict[str, tuple[Vector, Metadata]]: ...

    def delete(self, ids: Sequence[str] | None = None, filter: dict[str, Any] | None = None,
               namespace: str = "") -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def save(self) -> None:
        """Make what was written durable (an embedded index writes its files; a remote store has nothing to do)."""
        ...

    def close(self) -> None:
        """Release files and connections; the store is not used afterwards."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys_under(self, prefix: str) -> list[str]:
        """The keys in the folder ``prefix`` (ending in "/") and below it, in no set order."""
        ...

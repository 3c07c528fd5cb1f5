"""Pinecone through the official client: batched upserts, retries with backoff on 429/5xx, timeouts."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline import vendor
from pipeline.errors import Rejected, StoreError, Unavailable
from pipeline.types import Match, Metadata, Vector

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # vectors per upsert request (Pinecone's limit)
MAX_BYTES = 2 * 1024 * 1024  # bytes per upsert request (Pinecone's limit)


def _client(api_key: str, host: str | None, index_name: str | None, timeout: float, retries: int) -> Any:
    try:
        from pinecone import Pinecone, RetryConfig
    except ImportError as exc:
        raise StoreError(vendor.needs_extra("VECTOR_STORE=pinecone needs the pinecone client", "pinecone")) from exc
    # backoff between retries capped at the per-call timeout: a store that is down costs a few timeouts
    policy = RetryConfig(max_retries=retries, backoff_factor=0.1, max_wait=min(5.0, timeout))
    pc = Pinecone(api_key=api_key, timeout=timeout, retry_config=policy)
    if host:
        index = pc.Index(host=host)
    elif index_name:
        index = pc.Index(index_name)
    else:
        raise StoreError("VECTOR_STORE=pinecone needs PINECONE_INDEX_NAME (or IMGSEARCH_PINECONE_HOST)")
    _set_data_plane_retries(index, policy)
    return index


def _set_data_plane_retries(index: Any, policy: Any) -> None:
    """The client takes a retry policy for its control plane only; its data-plane REST client keeps a built-in
    one (4 attempts, jittered waits up to a minute), which would hold a query far past any job's deadline.
    Where this version of the client is built as expected, its data-plane HTTP client gets ours; elsewhere
    the built-in one stands and the job's deadline still bounds the wait."""
    try:
        from dataclasses import replace

        from pinecone._internal.constants import DATA_PLANE_API_VERSION
        from pinecone._internal.http_client import HTTPClient

        vendor.require("pinecone")  # the internals below were read on these versions only
        index._http = HTTPClient(replace(index._config, retry_config=policy), DATA_PLANE_API_VERSION)
    except (ImportError, AttributeError, TypeError, RuntimeError) as exc:
        log.warning("pinecone: the data-plane retry policy is the client's own (%s)", exc)


def batches(items: Sequence[dict[str, Any]], max_count: int = MAX_BATCH,
            max_bytes: int = MAX_BYTES) -> Iterator[list[dict[str, Any]]]:
    """Split vectors into requests under both of Pinecone's caps (count and encoded size)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for item in items:
        n = len(json.dumps(item, separators=(",", ":"))) + 1
        if batch and (len(batch) >= max_count or size + n > max_bytes - 1024):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


# 4xx answers about the store itself, not the request: a wrong key, an index that is missing, a timeout, a limit
_STORE_SIDE = {401, 403, 404, 408, 429}


def _callers_mistake(exc: Exception, status: object) -> bool:
    """A request the store refused as malformed (400, 422, ...), or one the client refused before sending it."""
    if isinstance(status, int):
        return 400 <= status < 500 and status not in _STORE_SIDE
    return isinstance(exc, ValueError) and type(exc).__module__.startswith("pinecone")


def _said(exc: Exception) -> str:
    """What the store said was wrong, cut short (the request's own data at most; never the key)."""
    body = getattr(exc, "body", None)
    message = (body.get("message") if isinstance(body, dict) else None) or str(exc)
    return str(message)[:200]


class PineconeVectorStore:
    def __init__(self, api_key: str, *, index_name: str | None = None, host: str | None = None,
                 timeout: float = 10.0, retries: int = 3) -> None:
        self.timeout = timeout
        self.index = _client(api_key, host, index_name, timeout, retries)

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as exc:  # the client's errors carry the status; keep the message, drop the key
            status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
            if _callers_mistake(exc, status):
                log.info("pinecone %s refused the request: %s %s", what, type(exc).__name__, status)
                raise Rejected(f"the vector store (pinecone) refused the {what} request as invalid"
                               + (f" (HTTP {status})" if status else "") + f": {_said(exc)}",
                               code="vector_store_rejected") from exc
            log.warning("pinecone %s failed: %s %s", what, type(exc).__name__, status)
            raise Unavailable(f"the vector store (pinecone) failed on {what}: {type(exc).__name__}"
                              + (f" {status}" if status else ""), code="vector_store_unavailable") from exc

    def upsert(self, items: Sequence[tuple[str, Vector, Metadata]], namespace: str = "") -> int:
        vectors = [{"id": vid, "values": np.asarray(vec, np.float32).tolist(), "metadata": meta}
                   for vid, vec, meta in items]
        for batch in batches(vectors):
            self._call("upsert", self.index.upsert, vectors=batch, namespace=namespace, show_progress=False)
        return len(vectors)

    def query(self, vector: Vector, top_k: int, filter: dict[str, Any] | None = None,
              namespace: str = "") -> list[Match]:
        res = self._call("query", self.index.query, vector=np.asarray(vector, np.float32).tolist(), top_k=top_k,
                         namespace=namespace, filter=filter or None, include_metadata=True)
        return [Match(id=m.id, score=float(m.score), metadata=dict(m.metadata or {})) for m in res.matches]

    def fetch(self, ids: Sequence[str], namespace: str = "") -> dict[str, tuple[Vector, Metadata]]:
        out: dict[str, tuple[Vector, Metadata]] = {}
        for start in range(0, len(ids), 200):  # keeps the GET's URL short
            res = self._call("fetch", self.index.fetch, ids=list(ids[start:start + 200]), namespace=namespace)
            for vid, v in res.vectors.items():
                out[vid] = (np.asarray(v.values, np.float32), dict(v.metadata or {}))
        return out

    def delete(self, ids: Sequence[str] | None = None, filter: dict[str, Any] | None = None,
               namespace: str = "") -> int:
        if ids is not None:
            n = len(self.fetch(ids, namespace)) if ids else 0
            for start in range(0, len(ids), 1000):
                self._call("delete", self.index.delete, ids=list(ids[start:start + 1000]), namespace=namespace)
            return n
        if filter:
            before = self._count(namespace)
            self._call("delete", self.index.delete, filter=filter, namespace=namespace)
            return max(0, before - self._count(namespace))
        raise StoreError("delete needs ids or a filter")

    def _count(self, namespace: str) -> int:
        ns = self.stats()["namespaces"].get(namespace)
        return int(ns["vector_count"]) if ns else 0

    def stats(self) -> dict[str, Any]:
        res = self._call("describe_index_stats", self.index.describe_index_stats)
        namespaces = {name: {"vector_count": int(s.vector_count)} for name, s in (res.namespaces or {}).items()}
        return {"dimension": res.dimension, "total_vector_count": int(res.total_vector_count or 0),
                "namespaces": namespaces}

    def save(self) -> None:
        """Nothing to do: every write is durable once Pinecone answered it."""

    def close(self) -> None:
        """Nothing to release: the client's connections close with the process."""

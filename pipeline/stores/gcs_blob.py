"""Google Cloud Storage through google-cloud-storage: per-call timeouts, the client's retries on idempotent
calls. ``STORAGE_EMULATOR_HOST`` points it at an emulator (tests use gcp-storage-emulator)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.errors import StoreError, Unavailable
from pipeline.vendor import needs_extra

log = logging.getLogger(__name__)
T = TypeVar("T")


class GcsBlobStore:
    def __init__(self, bucket: str, *, project: str | None = None, prefix: str = "", timeout: float = 10.0,
                 create: bool = False) -> None:
        try:
            from google.api_core import exceptions as gexc
            from google.cloud import storage
        except ImportError as exc:
            raise StoreError(needs_extra("BLOB_STORE=gcs needs google-cloud-storage", "gcs")) from exc
        self._gexc = gexc
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=project or "local", credentials=AnonymousCredentials())
        else:
            client = storage.Client(project=project)
        self.bucket = client.bucket(bucket)
        if create and not self.bucket.exists(timeout=timeout):
            client.create_bucket(bucket, timeout=timeout)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.timeout = timeout
        from google.cloud.storage.retry import DEFAULT_RETRY

        # the client's retries, bounded: a dead store costs a few timeouts, not the default two minutes
        self.retry = (DEFAULT_RETRY.with_timeout(3 * timeout) if hasattr(DEFAULT_RETRY, "with_timeout")
                      else DEFAULT_RETRY.with_deadline(3 * timeout))

    def _blob(self, key: str) -> Any:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid blob key {key!r}", code="invalid_request")
        return self.bucket.blob(self.prefix + key)

    def _run(self, what: str, key: str, call: Callable[[Any], T], missing: T) -> T:
        """One call on one blob: a missing blob gives ``missing``; any other failure is Unavailable."""
        blob = self._blob(key)
        try:
            return call(blob)
        except self._gexc.NotFound:
            return missing
        except Exception as exc:
            log.warning("gcs %s %s failed: %s", what, key, type(exc).__name__)
            raise Unavailable(f"the blob store (gcs) failed on {what} of {key}: {type(exc).__name__}",
                              code="blob_store_unavailable") from exc

    def get(self, key: str) -> bytes | None:
        return self._run("get", key, lambda b: b.download_as_bytes(timeout=self.timeout, retry=self.retry), None)

    def put(self, key: str, data: bytes) -> None:
        self._run("put", key, lambda b: b.upload_from_string(data, content_type="application/octet-stream",
                                                            timeout=self.timeout, retry=self.retry), None)

    def exists(self, key: str) -> bool:
        return bool(self._run("exists", key, lambda b: b.exists(timeout=self.timeout, retry=self.retry), False))

    def delete(self, key: str) -> None:
        self._run("delete", key, lambda b: b.delete(timeout=self.timeout, retry=self.retry), None)

    def keys_under(self, prefix: str) -> list[str]:
        if not prefix.endswith("/"):
            raise StoreError(f"not a folder: {prefix!r}", code="invalid_request")
        self._blob(prefix.rstrip("/"))  # the key's checks
        try:
            names = [b.name for b in self.bucket.client.list_blobs(self.bucket, prefix=self.prefix + prefix,
                                                                   timeout=self.timeout, retry=self.retry)]
        except Exception as exc:
            log.warning("gcs list %s failed: %s", prefix, type(exc).__name__)
            raise Unavailable(f"the blob store (gcs) failed on list of {prefix}: {type(exc).__name__}",
                              code="blob_store_unavailable") from exc
        return [n[len(self.prefix):] for n in names]

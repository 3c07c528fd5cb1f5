"""Stored vectors name the SigLIP version that embedded them (ingest writes ``model_version`` into each vector's
metadata). A query vector from one model searched against image vectors from another ranks at random, silently;
so a worker serves a namespace only while the candidates it finds there were embedded by its own SigLIP, and
refuses the query otherwise, saying which versions it found and what to change. The check reads the metadata the
query already returned: it costs no call, and a worker still starts (an ingest worker must, to re-embed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.errors import ImgSearchError
from pipeline.types import Match


class _Versioned(Protocol):
    @property
    def version(self) -> str: ...


@dataclass(frozen=True)
class ModelVersions:
    """The models that make an item's stored artifacts: the SigLIP image tower (its vector) and the reranker (its
    features). Written to the ledger, the post's blob and the fan-out's messages as ``image|reranker``: this class
    is the one place that builds and reads that text."""

    image: str
    reranker: str

    @classmethod
    def of(cls, image_encoder: _Versioned, reranker: _Versioned) -> ModelVersions:
        return cls(image_encoder.version, reranker.version)

    @classmethod
    def parse(cls, text: str) -> ModelVersions | None:
        """The versions ``text`` names, or None where it names none ('' for a takedown's row, or rows written
        by hand). The image version is what precedes the first ``|``."""
        image, sep, reranker = text.partition("|")
        return cls(image, reranker) if sep else None

    def __str__(self) -> str:
        return f"{self.image}|{self.reranker}"


class ModelVersionMismatch(ImgSearchError):
    code = "model_version_mismatch"


def check_versions(matches: Sequence[Match], version: str, namespace: str) -> None:
    """Raise ``ModelVersionMismatch`` if any match names another model version than ``version``; matches without
    a version (written by hand, or before versions were stored) pass."""
    found = Counter(str(m.metadata["model_version"]) for m in matches if m.metadata.get("model_version"))
    other = {v: n for v, n in found.items() if v != version}
    if other:
        seen = ", ".join(f"{v} ({n} of {len(matches)} candidates)" for v, n in sorted(other.items()))
        raise ModelVersionMismatch(
            f"the vectors in namespace {namespace!r} were embedded by SigLIP {seen}, but this worker's SigLIP is "
            f"{version}: it refuses to serve them. Point IMGSEARCH_SIGLIP_MODEL at the model that embedded them, or "
            "re-ingest with this one (into a new namespace, IMGSEARCH_NAMESPACE, to keep serving the old one meanwhile)")

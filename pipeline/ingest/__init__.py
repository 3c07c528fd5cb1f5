"""Ingest: sources (Reddit, a folder) -> downloads -> near-duplicate check -> embeddings -> stores, recorded in
a ledger so runs are idempotent and resumable. See ``run.py`` for the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.ingest.items import VECTOR_FIELDS, Item, ItemStages
from pipeline.ingest.ledger import Ledger, LedgerRow
from pipeline.ingest.report import IngestReport
from pipeline.ingest.run import IngestRun, run_ingest, takedown
from pipeline.ingest.sources import FolderSource, Post, RedditSource, Source, make_source
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.settings import IngestSettings

__all__ = ["VECTOR_FIELDS", "FolderSource", "IngestReport", "IngestRun", "Item", "ItemStages", "Ledger", "LedgerRow", "Post",
           "RedditSource", "Source", "ingest_folder", "make_source", "run_ingest", "takedown"]


def ingest_folder(settings: IngestSettings, folder: Path | str, image_encoder: ImageEncoder, reranker: Reranker,
                  vectors: VectorStore, blobs: BlobStore, **kw: Any) -> IngestReport:
    """Ingest a folder of images (with optional metadata) into the stores: a folder-source run."""
    return run_ingest(settings, FolderSource(folder), image_encoder, reranker, vectors, blobs, **kw)

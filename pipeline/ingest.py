"""A minimal folder ingest: images (+ optional JSON metadata) -> SigLIP vectors + BLIP features -> stores.

Per image: the image normalised once (RGB JPEG), its post metadata, its BLIP vision features, and its
SigLIP vector with metadata. Ids already in both stores are skipped before any work; a broken image is
recorded and skipped, never fatal. (The full ingest, with sources and scheduling, is a later issue.)
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import features as featcodec
from pipeline.protocols import BlobStore, ImageEncoder, Reranker, VectorStore
from pipeline.search import feature_key, image_key, post_key

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
VECTOR_FIELDS = ("subreddit", "title", "created_utc", "over_18", "score", "width", "height", "permalink")
MAX_SIDE = 1024


@dataclass
class FolderItem:
    id: str
    path: Path
    metadata: dict[str, Any]


@dataclass
class IngestReport:
    seen: int = 0
    skipped: int = 0
    ingested: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def scan_folder(folder: Path) -> Iterator[FolderItem]:
    """Images in ``folder`` (sorted), each with metadata from ``<stem>.json`` or ``manifest.json``."""
    manifest: dict[str, dict[str, Any]] = {}
    if (folder / "manifest.json").is_file():
        raw = json.loads((folder / "manifest.json").read_text())
        entries = raw.values() if isinstance(raw, dict) else raw
        manifest = {e["file"]: e for e in entries}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        meta = dict(manifest.get(path.name, {}))
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            meta.update(json.loads(sidecar.read_text()))
        meta.pop("file", None)
        yield FolderItem(id=str(meta.pop("id", path.stem)), path=path, metadata=meta)


def _normalise(path: Path) -> tuple[Image.Image, bytes]:
    with Image.open(path) as im:
        im.seek(0)  # a GIF's first frame
        rgb = im.convert("RGB")
    rgb.thumbnail((MAX_SIDE, MAX_SIDE))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    return rgb, buf.getvalue()


def ingest_items(items: Sequence[FolderItem], image_encoder: ImageEncoder, reranker: Reranker,
                 vectors: VectorStore, blobs: BlobStore, *, namespace: str = "", batch_size: int = 16) -> IngestReport:
    report = IngestReport(seen=len(items))
    t: dict[str, float] = {"decode": 0.0, "embed": 0.0, "write": 0.0}
    have = vectors.fetch([it.id for it in items], namespace=namespace) if items else {}
    todo = [it for it in items if not (it.id in have and blobs.exists(feature_key(reranker.version, it.id)))]
    report.skipped = len(items) - len(todo)
    for start in range(0, len(todo), batch_size):
        batch, images, jpegs = [], [], []
        t0 = time.perf_counter()
        for it in todo[start:start + batch_size]:
            try:
                im, jpeg = _normalise(it.path)
            except Exception as exc:  # a broken file is recorded, never fatal
                report.failed[it.id] = f"{type(exc).__name__}: {exc}"
                continue
            batch.append(it)
            images.append(im)
            jpegs.append(jpeg)
        t1 = time.perf_counter()
        if not batch:
            continue
        vecs = image_encoder.encode_images(images)
        feats = reranker.vision_features(images)
        t2 = time.perf_counter()
        rows = []
        for it, im, jpeg, vec, feat in zip(batch, images, jpegs, vecs, feats, strict=True):
            meta = {**it.metadata, "width": im.width, "height": im.height}
            blobs.put(image_key(it.id, "jpg"), jpeg)
            blobs.put(post_key(it.id), json.dumps({"id": it.id, **meta}).encode())
            blobs.put(feature_key(reranker.version, it.id), featcodec.encode(feat))
            vmeta = {k: meta[k] for k in VECTOR_FIELDS if k in meta and meta[k] is not None}
            vmeta["model_version"] = image_encoder.version
            rows.append((it.id, vec, vmeta))
        vectors.upsert(rows, namespace=namespace)  # last: a vector only exists once its blobs do
        report.ingested += len(rows)
        t["decode"] += t1 - t0
        t["embed"] += t2 - t1
        t["write"] += time.perf_counter() - t2
    save = getattr(vectors, "save", None)
    if callable(save):
        save()
    report.timings = {k: round(v * 1000, 1) for k, v in t.items()}
    return report


def ingest_folder(folder: Path | str, image_encoder: ImageEncoder, reranker: Reranker, vectors: VectorStore,
                  blobs: BlobStore, *, namespace: str = "", batch_size: int = 16) -> IngestReport:
    return ingest_items(list(scan_folder(Path(folder))), image_encoder, reranker, vectors, blobs,
                        namespace=namespace, batch_size=batch_size)

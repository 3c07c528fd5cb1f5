"""Retrieval quality: recall@1/5/10 for SigLIP alone, and after reranking its top 32 with BLIP (fused
``w*ITM + (1-w)*cosine`` for each fusion weight asked for, ITM alone, cosine alone).

Two galleries: the kit's held-out world (``n`` scenes, each with a colour-shape pair never seen in training, no
two with the same caption; each query is one of a scene's captions), or a person's own folder of images with
captions (``load_manifest``), where each caption's right answer is its image and every other image in the folder
is a distractor. The sweep over fusion weights lets a deployment choose its weights from its own data.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engines.kit.world import make_split
from pipeline.protocols import Reranker, TextEncoder
from pipeline.search.fusion import fuse, rank

KS = (1, 5, 10)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


@dataclass
class Gallery:
    """Images, and queries each with the index of its one right image."""

    name: str
    images: list[Image.Image]
    queries: list[str]
    answers: list[int]


def _recall(orders: list[np.ndarray], answers: Sequence[int], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``orders[i]``: gallery indices for query i, best first; the right one is ``answers[i]``."""
    pos = np.array([int(np.flatnonzero(o == a)[0]) if (o == a).any() else 10**9 for o, a in zip(orders, answers, strict=True)])
    return {f"R@{k}": round(float((pos < k).mean()), 4) for k in ks}


def held_out(n: int = 500, seed: int = 1, image_size: int = 64, phrasing: int | None = None) -> Gallery:
    """The kit's held-out world; one phrasing per query, rotating through the phrasings unless one is asked for."""
    items = make_split(n, held_out=True, seed=seed, unique=True)
    queries = [it.scene.captions()[(i if phrasing is None else phrasing) % len(it.scene.captions())]
               for i, it in enumerate(items)]
    return Gallery(f"held-out gallery of {n} scenes", [it.image(image_size) for it in items], queries, list(range(n)))


def _captions(entry: dict[str, Any]) -> list[str]:
    raw = entry.get("captions") or entry.get("caption") or entry.get("title") or []
    return [c.strip() for c in ([raw] if isinstance(raw, str) else raw) if isinstance(c, str) and c.strip()]


def load_manifest(folder: Path) -> Gallery:
    """A folder of images with captions: ``manifest.json`` (a list, or an object, of entries with ``file`` and
    ``caption``, ``captions`` or ``title``) or ``manifest.csv`` / ``captions.csv`` (columns ``file`` and
    ``caption``, one row per caption). Images without a caption stay in the gallery as distractors."""
    folder = Path(folder)
    entries: list[dict[str, Any]] = []
    if (folder / "manifest.json").is_file():
        raw = json.loads((folder / "manifest.json").read_text())
        entries += list(raw.values() if isinstance(raw, dict) else raw)
    for name in ("manifest.csv", "captions.csv"):
        if (folder / name).is_file():
            with open(folder / name, newline="") as fh:
                entries += list(csv.DictReader(fh))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()) if folder.is_dir() else []
    index = {p.name: i for i, p in enumerate(files)}
    queries: list[str] = []
    answers: list[int] = []
    missing = sorted({str(e.get("file")) for e in entries if str(e.get("file")) not in index})
    if missing:
        raise ValueError(f"{folder}: the manifest names images that are not in the folder: {', '.join(missing[:5])}")
    for e in entries:
        for caption in _captions(e):
            queries.append(caption)
            answers.append(index[str(e["file"])])
    if not queries:
        raise ValueError(f"{folder}: no captions found; write manifest.json ([{{\"file\": \"a.jpg\", \"caption\": "
                         "\"...\"}]) or manifest.csv (columns file, caption) beside the images")
    images = [Image.open(p).convert("RGB") for p in files]
    return Gallery(f"{folder.name}: {len(files)} images, {len(queries)} captions", images, queries, answers)


def evaluate_gallery(siglip: Any, blip: Reranker, gallery: Gallery, *, top: int = 32,
                     weights: Sequence[float] = (0.7,)) -> dict[str, Any]:
    """``siglip``: a TextEncoder that also encodes images (any backend); ``blip``: any Reranker backend. Fused
    rows, one per ITM weight ``w`` (cosine gets ``1 - w``), plus ITM and cosine alone."""
    encoder: TextEncoder = siglip
    images, n = gallery.images, len(gallery.images)
    vectors = np.concatenate([siglip.encode_images(images[s:s + 64]) for s in range(0, n, 64)])
    feats = np.concatenate([blip.vision_features(images[s:s + 64]) for s in range(0, n, 64)])
    text = encoder.encode_text(gallery.queries)
    ann = [rank(vectors @ t) for t in text]
    out: dict[str, dict[str, float]] = {"siglip": _recall(ann, gallery.answers)}
    names = [f"rerank {w:g}" for w in weights] + ["rerank itm", "rerank cosine"]
    reranked: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for q, order in zip(gallery.queries, ann, strict=True):
        head, tail = order[:top], order[top:]
        itm, cos = blip.score(q, list(feats[head]))
        scores = [fuse(itm, cos, w, 1.0 - w) for w in weights] + [itm, cos]
        for name, s in zip(names, scores, strict=True):
            reranked[name].append(np.concatenate([head[rank(np.asarray(s, np.float32))], tail]))
    for name, orders in reranked.items():
        out[name] = _recall(orders, gallery.answers)
    return {"gallery": gallery.name, "queries": len(gallery.queries), "rerank_top": top, "weights": list(weights),
            "recall": out}


def agreement(ref: Reranker, other: Reranker, queries: Sequence[str], feats: Sequence[np.ndarray],
              top: int = 10) -> tuple[float, float]:
    """How closely ``other`` (another precision or backend) reranks as ``ref`` does: over each query's rerank of
    ``feats``, the largest ITM difference, and the mean share of the fused top ``top`` that both keep."""
    itm_diff, overlap = 0.0, []
    for q in queries:
        (i_ref, c_ref), (i_other, c_other) = ref.score(q, list(feats)), other.score(q, list(feats))
        itm_diff = max(itm_diff, float(np.abs(i_ref - i_other).max()))
        kept = [set(rank(fuse(i, c))[:top].tolist()) for i, c in ((i_ref, c_ref), (i_other, c_other))]
        overlap.append(len(kept[0] & kept[1]) / top)
    return itm_diff, float(np.mean(overlap))


def evaluate(siglip: Any, blip: Reranker, *, n: int = 500, seed: int = 1, top: int = 32, image_size: int = 64,
             phrasing: int | None = None, itm_weight: float = 0.7, cosine_weight: float = 0.3) -> dict[str, Any]:
    """The held-out world at one fusion weight, reported as "rerank fused" (the kit's manifest keeps that key)."""
    report = evaluate_gallery(siglip, blip, held_out(n, seed, image_size, phrasing), top=top, weights=(itm_weight,))
    recall = report["recall"]
    recall["rerank fused"] = recall.pop(f"rerank {itm_weight:g}")
    report["recall"] = {k: recall[k] for k in ("siglip", "rerank fused", "rerank itm", "rerank cosine")}
    report["gallery"] = n
    report["fusion"] = {"itm": itm_weight, "cosine": cosine_weight}
    return report


def _label(key: str, report: dict[str, Any]) -> str:
    if key == "siglip":
        return "SigLIP alone"
    top, what = report.get("rerank_top", 32), key.removeprefix("rerank ")
    if what == "fused":
        f = report.get("fusion", {"itm": 0.7, "cosine": 0.3})
        return f"BLIP rerank top {top}: {f['itm']:g}*ITM + {f['cosine']:g}*cosine"
    if what in ("itm", "cosine"):
        return f"BLIP rerank top {top}: {'ITM' if what == 'itm' else 'cosine'} only"
    w = float(what)
    return f"BLIP rerank top {top}: {w:g}*ITM + {round(1 - w, 4):g}*cosine"


def table(report: dict[str, Any]) -> str:
    """A markdown table, one row per ranking (one per fusion weight in a sweep)."""
    rows = ["| ranking | " + " | ".join(f"R@{k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for key, rec in report["recall"].items():
        rows.append(f"| {_label(key, report)} | " + " | ".join(f"{rec[f'R@{k}']:.3f}" for k in KS) + " |")
    return "\n".join(rows)

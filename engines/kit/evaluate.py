"""Retrieval quality on the held-out world: recall@1/5/10 for SigLIP alone, and after reranking its top 32
with BLIP (fused ``0.7*ITM + 0.3*cosine``, ITM alone, cosine alone).

The gallery holds ``n`` held-out scenes (each with a colour-shape pair never seen in training), no two
with the same caption; each query is one of a scene's captions and has exactly one right image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.kit.world import make_split
from pipeline.fusion import fuse, rank
from pipeline.protocols import Reranker, TextEncoder

KS = (1, 5, 10)


def _recall(orders: list[np.ndarray], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``orders[i]``: gallery indices for query i, best first; the right one is i."""
    pos = np.array([int(np.flatnonzero(o == i)[0]) if (o == i).any() else 10**9 for i, o in enumerate(orders)])
    return {f"R@{k}": round(float((pos < k).mean()), 4) for k in ks}


def evaluate(siglip: Any, blip: Reranker, *, n: int = 500, seed: int = 1, top: int = 32, image_size: int = 64,
             phrasing: int | None = None, itm_weight: float = 0.7, cosine_weight: float = 0.3) -> dict[str, Any]:
    """``siglip``: a TextEncoder that also encodes images (any backend); ``blip``: any Reranker backend."""
    encoder: TextEncoder = siglip
    items = make_split(n, held_out=True, seed=seed, unique=True)
    images = [it.image(image_size) for it in items]
    # one phrasing per query, rotating through the phrasings unless one is asked for
    queries = [it.scene.captions()[(i if phrasing is None else phrasing) % len(it.scene.captions())]
               for i, it in enumerate(items)]
    gallery = np.concatenate([siglip.encode_images(images[s:s + 64]) for s in range(0, n, 64)])
    feats = np.concatenate([blip.vision_features(images[s:s + 64]) for s in range(0, n, 64)])
    text = encoder.encode_text(queries)
    ann = [rank(gallery @ t) for t in text]
    out: dict[str, dict[str, float]] = {"siglip": _recall(ann)}
    reranked: dict[str, list[np.ndarray]] = {"fused": [], "itm": [], "cosine": []}
    for q, order in zip(queries, ann, strict=True):
        head, tail = order[:top], order[top:]
        itm, cos = blip.score(q, list(feats[head]))
        for name, s in (("fused", fuse(itm, cos, itm_weight, cosine_weight)), ("itm", itm), ("cosine", cos)):
            reranked[name].append(np.concatenate([head[rank(np.asarray(s, np.float32))], tail]))
    for name, orders in reranked.items():
        out[f"rerank {name}"] = _recall(orders)
    return {"gallery": n, "rerank_top": top, "recall": out}


def table(report: dict[str, Any]) -> str:
    rows = ["| ranking | " + " | ".join(f"R@{k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    names = {"siglip": "SigLIP alone", "rerank fused": "BLIP rerank top 32: 0.7*ITM + 0.3*cosine",
             "rerank itm": "BLIP rerank top 32: ITM only", "rerank cosine": "BLIP rerank top 32: cosine only"}
    for key, rec in report["recall"].items():
        rows.append(f"| {names[key]} | " + " | ".join(f"{rec[f'R@{k}']:.3f}" for k in KS) + " |")
    return "\n".join(rows)

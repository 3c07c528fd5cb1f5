"""Why a result matched: the explanation of one post in a finished job, and its overlay on the stored image.

The maps come from ``engines/explain.py`` (torch). An ONNX Runtime or TensorRT reranker has no torch pass to
read, so its explained results fall back to a torch engine of the same checkpoint, loaded on first use
(``torch_engine``); only the explained results run there. Image queries (``like``, uploads) rank by image
similarity, with no ITM pass over words, so they answer that no text-to-image map exists instead of an empty
map.

The API process imports this module for its route (never torch: ``engines.explain`` loads inside the functions
that compute).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipeline.errors import Conflict, NotFound
from pipeline.types import Job, SearchParams

EXPLAIN_TASK = "imgsearch.explain"  # the worker task (workers/tasks.py) the API's explain route sends
EXPLAIN_TOP = 10  # how many of a job's results explain: true explains
NO_TEXT_MAP = ("this job searched by an image (like or upload): it ranks by image similarity and has no "
               "text-to-image attention, so there is no map to show")

_fallback: dict[str, Any] = {}
_fallback_lock = threading.Lock()


def torch_engine(reranker: Any) -> Any:
    """``reranker`` itself where it is the torch backend; else a torch BLIP of the same checkpoint, loaded once
    per process (what an ONNX Runtime or TensorRT worker explains with)."""
    if getattr(reranker, "backend", "") == "torch":
        return reranker
    key = str(reranker.path)
    with _fallback_lock:
        if key not in _fallback:
            from engines.blip import TorchBlip

            _fallback[key] = TorchBlip(key, max_tokens=reranker.max_tokens)
        return _fallback[key]


def text_query(job: Job) -> str | None:
    """The job's words, or None for an image query (no text-to-image map)."""
    params = SearchParams(query=job.query, **{k: v for k, v in job.params.items() if k != "query"})
    return job.query if params.kind == "text" else None


def explain_posts(job: Job, post_ids: Sequence[str], reranker: Any,
                  features: Callable[[Sequence[str]], dict[str, NDArray[Any]]], *,
                  method: str | None = None, layer: int | None = None) -> dict[str, dict[str, Any]]:
    """The explanation of each of ``post_ids`` in ``job``'s results: ``{"grid", "layer", "method"}``, or
    ``{"available": False, "reason"}`` for an image query. 409 while the job is not done; 404 for a post not in
    its results (or whose stored features are gone). ``features``: stored vision features by post id."""
    if job.status != "done":
        raise Conflict(f"job {job.id} is {job.status}: explanations exist once it is done")
    ranked = {r.id for r in job.results or []}
    missing = [p for p in post_ids if p not in ranked]
    if missing:
        raise NotFound(f"post {missing[0]} is not among job {job.id}'s results")
    query = text_query(job)
    if query is None:
        return {p: {"available": False, "reason": NO_TEXT_MAP} for p in post_ids}
    found = features(post_ids)
    gone = [p for p in post_ids if p not in found]
    if gone:
        raise NotFound(f"the stored features of post {gone[0]} are gone")
    from engines.explain import METHODS, explain

    maps = explain(torch_engine(reranker), query, [found[p] for p in post_ids], method=method or METHODS[0],
                   layer=layer)
    return {p: m.as_json() for p, m in zip(post_ids, maps, strict=True)}


def explain_results(params: SearchParams, results: Sequence[Any], reranker: Any,
                    features: Callable[[Sequence[str]], dict[str, NDArray[Any]]], *, top: int = EXPLAIN_TOP) -> None:
    """``explain: true``: the first ``top`` results each get ``explanation`` (a map, or for an image query why
    there is none), in the worker right after the search. ``features``: stored vision features by post id."""
    shown = list(results[:top])
    if params.kind != "text":
        for r in shown:
            r.explanation = {"available": False, "reason": NO_TEXT_MAP}
        return
    found = features([r.id for r in shown])
    have = [r for r in shown if r.id in found]
    from engines.explain import explain

    maps = explain(torch_engine(reranker), params.query, [found[r.id] for r in have])
    for r, m in zip(have, maps, strict=True):
        r.explanation = m.as_json()


def _colours(w: NDArray[np.float32]) -> NDArray[np.uint8]:
    """A blue-to-red ramp (the page's legend draws the same one): 0 -> blue, 0.5 -> green, 1 -> red."""
    r = np.clip(2 * w - 1, 0, 1)
    g = 1 - np.abs(2 * w - 1)
    b = np.clip(1 - 2 * w, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay_png(image: bytes, heatmap: Any, *, alpha: float = 0.45) -> bytes:
    """The stored image with the map (scaled to its peak, smoothly resized to the image) blended over it."""
    grid = np.asarray(heatmap["grid"] if isinstance(heatmap, dict) else heatmap.grid, np.float32)
    base = Image.open(io.BytesIO(image)).convert("RGB")
    peak = float(grid.max()) or 1.0
    small = Image.fromarray(_colours(grid / peak), "RGB")
    heat = small.resize(base.size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    Image.blend(base, heat, alpha).save(out, "PNG")
    return out.getvalue()

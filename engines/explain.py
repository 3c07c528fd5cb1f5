"""Where in each picture BLIP's ITM looked: a heatmap per candidate over the image's patch grid.

Two methods, both read from the reassociated ITM pass (``engines/crossattn.py``) through its ``AttentionTap``:

- ``attention``: the text [CLS] row's cross-attention probabilities over the image patches at one layer,
  averaged over heads. Gradient-free: captured from the rerank pass itself (``score_with_maps``).
- ``gradcam``: LAVIS's ITM Grad-CAM: those probabilities times the gradient of each candidate's ITM logit with
  respect to them (negative gradients clipped), averaged over heads. Needs a backward pass, so it reruns only
  the candidates it explains.

The image [CLS] token is dropped; the patches form a ``grid x grid`` square (24 x 24 for BLIP at 384 px, 8 x 8
for the kit). Each map is non-negative and sums to 1 (a map with no mass is uniform).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from engines.crossattn import AttentionTap, ReassociatedItm

METHODS = ("gradcam", "attention")  # the first is the default: it localised better on the kit (the issue-30 note)


def default_layer(method: str, layers: int) -> int:
    """Where each method localised best on the kit (3 text layers; tests/quality/test_explain_quality.py):
    Grad-CAM at two thirds of the depth (layer 1 of 0-2; LAVIS's BLIP choice, 7 of 0-11, by the same rule),
    attention at the last layer (the only one whose [CLS] row alone the rerank pass computes)."""
    return max(0, 2 * layers // 3 - 1) if method == "gradcam" else layers - 1


@dataclass(frozen=True)
class Heatmap:
    grid: NDArray[np.float32]  # n x n, non-negative, sums to 1
    layer: int  # 0-based index of the text layer the map was read at
    method: str

    def as_json(self) -> dict[str, Any]:
        return {"grid": np.round(self.grid, 6).tolist(), "layer": self.layer, "method": self.method}


def _normalise(per_patch: torch.Tensor) -> NDArray[np.float32]:
    """N x (P-1) non-negative weights -> N x n x n maps summing to 1."""
    w = per_patch.detach().float().clamp_min(0).cpu().numpy()
    n = math.isqrt(w.shape[1])
    if n * n != w.shape[1]:
        raise ValueError(f"{w.shape[1]} image patches do not form a square grid")
    total = w.sum(1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1), 1.0 / w.shape[1])
    return w.reshape(-1, n, n).astype(np.float32)


def _layer_index(rx: ReassociatedItm, layer: int) -> int:
    return layer % len(rx.m.text_encoder.encoder.layer)


def torch_cores(engine: Any) -> tuple[ReassociatedItm, Any]:
    """The engine's reassociated torch module and a function from NumPy arrays to its tensors. Only the torch
    backend has one; ONNX Runtime and TensorRT engines are explained by a torch engine of the same model
    (``pipeline/search/explain.py``)."""
    cores = getattr(engine, "cores", None)
    if cores is None or not hasattr(engine, "_t"):
        raise TypeError(f"{type(engine).__name__} has no torch ITM pass to explain")
    return cores.rx, engine._t


def _inputs(engine: Any, query: str, features: Sequence[NDArray[Any]]) -> tuple[torch.Tensor, ...]:
    _, t = torch_cores(engine)
    ids, mask = engine.query_inputs(query)
    embeds = np.stack([np.asarray(f) for f in features])
    return t(ids), t(mask), t(np.zeros(len(features), np.int64)), t(embeds)


def attention_maps(engine: Any, query: str, features: Sequence[NDArray[Any]], *,
                   layer: int = -1) -> tuple[NDArray[np.float32], list[Heatmap]]:
    """ITM match probabilities and an attention map for each candidate, from one reassociated ITM pass (the
    rerank's own pass over these candidates: the scores are the rerank's ITM scores)."""
    rx, _ = torch_cores(engine)
    tap = AttentionTap(layer)
    with engine.lock, torch.inference_mode():
        rx.tap = tap
        try:
            itm, _ = rx(*_inputs(engine, query, features))
        finally:
            rx.tap = None
    probs = torch.cat([tap.cls_rows(p) for p in tap.probs])                          # N x H x P
    grids = _normalise(probs.float().mean(1)[:, 1:])
    index = _layer_index(rx, layer)
    return itm.float().cpu().numpy(), [Heatmap(g, index, "attention") for g in grids]


def gradcam_maps(engine: Any, query: str, features: Sequence[NDArray[Any]], *,
                 layer: int = -1) -> list[Heatmap]:
    """LAVIS-style ITM Grad-CAM for each candidate: attention x d(ITM logit)/d(attention), gradients clipped
    at zero, averaged over heads. Reruns the ITM pass on these candidates with gradients."""
    rx, _ = torch_cores(engine)
    tap = AttentionTap(layer)
    ids, mask, owner, embeds = _inputs(engine, query, features)
    with engine.lock, torch.enable_grad():
        rx.tap = tap
        try:
            itm, _ = rx(ids, mask, owner, embeds.detach().clone().requires_grad_(True))
            (probs,) = tap.probs
            # the ITM logit (log-odds of a match) of each candidate; candidates are independent, so one gradient
            # of the sum, taken for the probabilities alone (no weight gradients accumulate)
            (grad,) = torch.autograd.grad(torch.logit(itm.float(), eps=1e-6).sum(), probs)
        finally:
            rx.tap = None
    probs, grad = tap.cls_rows(probs), tap.cls_rows(grad)
    cam = (probs.detach().float() * grad.float().clamp_min(0)).mean(1)[:, 1:]
    index = _layer_index(rx, layer)
    return [Heatmap(g, index, "gradcam") for g in _normalise(cam)]


def explain(engine: Any, query: str, features: Sequence[NDArray[Any]], *, method: str = METHODS[0],
            layer: int | None = None) -> list[Heatmap]:
    """A map per candidate; ``layer`` None: the method's ``default_layer``."""
    if method not in METHODS:
        raise ValueError(f"unknown explain method {method!r}; valid: {', '.join(METHODS)}")
    if not len(features):
        return []
    if layer is None:
        layer = default_layer(method, len(torch_cores(engine)[0].m.text_encoder.encoder.layer))
    if method == "attention":
        return attention_maps(engine, query, features, layer=layer)[1]
    return gradcam_maps(engine, query, features, layer=layer)

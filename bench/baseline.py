"""Baselines the benchmarks measure against.

``ReassociatedItmOnMain`` and ``main_rerank``: the reassociated rerank pass as it was before issue 26's cuts
(the scores as B x HR x P with their own scaling pass, the value bias added per head, and stored float16
features converted every query), frozen here so ``bench.rerank`` times today's code against it in one run.

The original's way, for bench.load to measure against: one synchronous FastAPI process that answers each
request alone, in the event loop: encode the query -> search the vector store -> fetch each candidate's
pixels from the blob store -> per candidate, the BLIP vision tower on its pixels and the text side (ITM and
ITC) -> fuse ``0.7 * ITM + 0.3 * cosine``. Same models (torch fp32), same stores, same data as ours.

    python -m bench.baseline --port 8100     # with the IMGSEARCH_* settings of the data to serve
"""

from __future__ import annotations

import argparse
import io
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engines.blip import TorchBlip
from engines.crossattn import ReassociatedItm, _gather
from engines.siglip import TorchSiglip, l2
from pipeline.layout import image_key
from pipeline.settings import Settings, get_settings
from pipeline.stores import make_blob_store, make_vector_store

if TYPE_CHECKING:
    from fastapi import FastAPI


class ReassociatedItmOnMain(ReassociatedItm):
    """``engines/crossattn.py``'s pass before issue 26's cuts (commit 28a0fe3), method for method: its ITC text
    pass ran apart (``folds_text`` off)."""

    folds_text = False

    def _self_attention(self, layer: Any, h: torch.Tensor, neg: torch.Tensor, rows: int | None) -> torch.Tensor:
        """The layer's text self-attention; with ``rows`` only the first ``rows`` positions are computed (as
        queries), every position still serving as a key and a value."""
        a = layer.attention.self
        b, t, _ = h.shape
        hq = h if rows is None else h[:, :rows]
        r = hq.shape[1]
        q = a.query(hq).view(b, r, self.heads, self.head_dim).transpose(1, 2)
        k = a.key(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = a.value(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale + neg, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, r, -1)
        return layer.attention.output(ctx, hq)  # type: ignore[no-any-return]

    def _query_keys(self, layer: Any, a: torch.Tensor) -> torch.Tensor:
        """``Q_h W_k,h`` for every head, laid out B x HR x E for the scores (the key bias dropped: softmax
        cancels it). The heads are the batch of the product, so no weight is copied per candidate."""
        c = layer.crossattention.self
        b, r, _ = a.shape
        q = c.query(a).view(b * r, self.heads, self.head_dim).transpose(0, 1)         # H x BR x d
        w_k = c.key.weight.view(self.heads, self.head_dim, -1)                         # H x d x E
        qk = torch.bmm(q, w_k)                                                         # H x BR x E
        return qk.view(self.heads, b, r, -1).transpose(0, 1).reshape(b, self.heads * r, -1)

    def _cross_attention(self, layer: Any, a: torch.Tensor, qk: torch.Tensor, x: torch.Tensor,
                         index: int = 0) -> torch.Tensor:
        c = layer.crossattention.self
        b, r, _ = a.shape
        h, d = self.heads, self.head_dim
        # one product per candidate for all heads: its image tokens are shared by every head
        scores = torch.bmm(qk, x.transpose(1, 2)) * self.scale                         # B x HR x P
        probs = torch.softmax(scores, dim=-1)
        if self.tap is not None:
            self.tap.capture(index, len(self.m.text_encoder.encoder.layer), probs, h)
        px = torch.bmm(probs, x)                                                       # B x HR x E
        px = px.view(b, h, r, -1).transpose(0, 1).reshape(h, b * r, -1)                # H x BR x E
        w_v = c.value.weight.view(h, d, -1).transpose(1, 2)                            # H x E x d
        ctx = torch.bmm(px, w_v) + c.value.bias.view(h, 1, d)                          # H x BR x d
        ctx = ctx.view(h, b, r, d).permute(1, 2, 0, 3).reshape(b, r, h * d)
        return layer.crossattention.output(ctx, a)  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
                image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        te = self.m.text_encoder
        layers = te.encoder.layer
        last = len(layers) - 1
        x = image_embeds
        h = te.embeddings(input_ids=input_ids)                                         # Q x L x D
        neg = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        # the first layer up to its cross-attention scores: text only, once per query
        a = self._self_attention(layers[0], h, neg, 1 if last == 0 else None)
        qk = self._query_keys(layers[0], a)
        a, qk, neg = _gather(a, owner), _gather(qk, owner), _gather(neg, owner)
        for i, layer in enumerate(layers):
            if i:
                a = self._self_attention(layer, h, neg, 1 if i == last else None)
                qk = self._query_keys(layer, a)
            h = layer.feed_forward_chunk(self._cross_attention(layer, a, qk, x, i))
        cls = h[:, 0, :]
        itm = torch.softmax(self.m.itm_head(cls).float(), dim=-1)[:, 1]
        return itm, self.m.vision_proj(x[:, 0, :])


def main_rerank(blip: TorchBlip) -> TorchBlip:
    """``blip`` running the pass as it was before issue 26's cuts (its cores' reassociated module swapped; fed
    float16 features, as the worker's cache held them then, it converts them every query as it did)."""
    blip.cores.rx = ReassociatedItmOnMain(blip.model)
    return blip


def original_rerank(blip: TorchBlip, query: str, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: the vision tower on its pixels, then ITM and ITC text passes (as the original did)."""
    ids, mask = (torch.from_numpy(x) for x in blip.query_inputs(query))
    itm_out, cos_out = [], []
    with torch.inference_mode():
        for im in images:
            embeds = blip.cores.vision(blip.pixels([im]))
            itm, image_proj = blip.cores.itm(ids, mask, embeds)
            text = blip.cores.itc(ids, mask)
            itm_out.append(float(itm[0]))
            cos_out.append(float(l2(image_proj.numpy())[0] @ l2(text.numpy())[0]))
    return np.asarray(itm_out, np.float32), np.asarray(cos_out, np.float32)


def create_app(settings: Settings | None = None) -> FastAPI:
    from fastapi import FastAPI  # here, not at the top: bench.rerank imports this module's rerank alone, on GPU
    # machines without the API's packages too

    s = settings or get_settings()
    if s.engines.intra_op_threads:
        torch.set_num_threads(s.engines.intra_op_threads)
    siglip = TorchSiglip(s.engines.siglip_model)
    blip = TorchBlip(s.engines.blip_model)
    vectors, blobs = make_vector_store(s), make_blob_store(s)
    app = FastAPI(title="imgsearch baseline (the original's way)")

    @app.post("/search")
    async def search(body: dict[str, Any]) -> dict[str, Any]:  # blocking work in the event loop, as the original
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        vec = siglip.encode_text([str(body["query"])])[0]
        t["encode"] = time.perf_counter()
        cands = vectors.query(vec, s.top_k)
        t["retrieve"] = time.perf_counter()
        images = [Image.open(io.BytesIO(blobs.get(image_key(m.id, "jpg")) or b"")).convert("RGB") for m in cands]
        t["fetch"] = time.perf_counter()
        itm, cos = original_rerank(blip, str(body["query"]), images)
        t["rerank"] = time.perf_counter()
        fused = s.itm_weight * itm + s.cosine_weight * cos
        order = np.argsort(-fused, kind="stable")
        results = [[cands[i].id, float(fused[i])] for i in order]
        t["fuse"] = time.perf_counter()
        timings, last = {}, t0
        for stage, at in t.items():
            timings[stage], last = round((at - last) * 1000, 3), at
        timings["total"] = round((last - t0) * 1000, 3)
        return {"results": results, "timings": timings}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8100)
    args = ap.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

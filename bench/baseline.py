"""The original's way, for bench.load to measure against: one synchronous FastAPI process that answers each
request alone, in the event loop: encode the query -> search the vector store -> fetch each candidate's
pixels from the blob store -> per candidate, the BLIP vision tower on its pixels and the text side (ITM and
ITC) -> fuse ``0.7 * ITM + 0.3 * cosine``. Same models (torch fp32), same stores, same data as ours.

    python -m bench.baseline --port 8100     # with the IMGSEARCH_* settings of the data to serve
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image

from engines.blip import TorchBlip
from engines.siglip import TorchSiglip, l2
from pipeline.layout import image_key
from pipeline.settings import Settings, get_settings
from pipeline.stores import make_blob_store, make_vector_store


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

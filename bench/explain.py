"""What an explanation costs: ms added to a query for 10 explained results, against the plain query, in one run.

The plain query is the rerank of ``--candidates`` (the default rerank_k, 32) stored features; an explained one
is the same rerank followed by the maps of its top 10 (``engines/explain.py``): ``attention`` (one more
gradient-free ITM pass over the 10) and ``gradcam`` (the default: one ITM pass over the 10 with a backward).
The plain rerank and each method's maps alternate in one loop, and each figure is a median over ``--repeats``
(the added ms: the maps' own time after the query's rerank). Also the one-time load of
the torch engine an ONNX Runtime or TensorRT worker explains with (``pipeline.search.explain.torch_engine``): after it,
such a worker's explained results cost what the torch figures say.

    python -m bench.explain --quick   # the kit's BLIP (8 x 8 grid, 3 text layers): seconds
    python -m bench.explain           # also BLIP-base's full size (random weights, 24 x 24 grid, 12 layers)

The last line is JSON: ``{model: {plain_ms, attention_added_ms, gradcam_added_ms, torch_load_ms}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.blip import TorchBlip
from engines.explain import explain
from engines.kit import KIT_DIR

EXPLAINED = 10


def _ms(f: Any) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def measure(path: Path, query: str, candidates: int, repeats: int) -> dict[str, float]:
    t = time.perf_counter()
    engine = TorchBlip(str(path))
    load_ms = (time.perf_counter() - t) * 1000
    patches, width = engine.shape["patches"], engine.shape["width"]
    rng = np.random.default_rng(0)
    feats = list(rng.standard_normal((candidates, patches, width)).astype(np.float16))
    top = feats[:EXPLAINED]
    runs: dict[str, list[float]] = {"plain": [], "attention": [], "gradcam": []}
    for i in range(repeats + 1):
        # one query, explained: its rerank, then the maps of its top 10 (the added part, timed on its own: a
        # difference of two noisy totals on a shared machine can come out negative)
        plain = _ms(lambda: engine.score(query, feats))
        att = _ms(lambda: explain(engine, query, top, method="attention"))
        cam = _ms(lambda: explain(engine, query, top, method="gradcam"))
        if i:  # the first round warms up
            for k, v in (("plain", plain), ("attention", att), ("gradcam", cam)):
                runs[k].append(v)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"plain_ms": round(med["plain"], 1), "attention_added_ms": round(med["attention"], 1),
            "gradcam_added_ms": round(med["gradcam"], 1), "torch_load_ms": round(load_ms, 1),
            "grid": int(round((patches - 1) ** 0.5)), "candidates": candidates, "explained": EXPLAINED}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the kit only")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    out = {"kit": measure(KIT_DIR / "blip", "a large blue cross at the left on a white background", a.candidates,
                          a.repeats)}
    print(f"kit: {out['kit']}", flush=True)
    if not a.quick:
        from engines.fullsize import make_fullsize_models

        with tempfile.TemporaryDirectory() as tmp:
            path = make_fullsize_models(tmp, which=("blip-base",))["blip-base"]
            out["blip-base"] = measure(path, "a cat sitting on a laptop keyboard", a.candidates, max(1, a.repeats // 2))
            print(f"blip-base: {out['blip-base']}", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), **out}))


if __name__ == "__main__":
    main()

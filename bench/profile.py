"""Where the reassociated rerank's time goes on this machine: ``python -m bench.engines --profile``.

One query of 8 tokens against 32 candidates' stored features (BLIP-base sized random weights, or the tiny model
with ``--models tiny``), torch at ``--precision`` (bf16 or fp32), the worker's own pass (``TorchBlip.score``):
``torch.profiler`` over a few calls, each op's self time per call, grouped:

- image attention: the two products over the image tokens per candidate (``(Q W_k) X^T`` and ``softmax . X``);
- weight products: every product with a weight matrix (the layers' Linear, ``Q W_k`` and ``(P X) W_v``);
- text attention: self-attention's products over the query's tokens;
- the rest by op (LayerNorm, softmax, GELU, copies, casts, adds, ...).

Achieved FLOP/s of each product group against this machine's rate for a 2048 x 2048 x 2048 matmul in the same
dtype, and the memory floor: the stored features one query reads (32 x 577 x 768 float16) over the measured
memory bandwidth (a large copy's). The last line is the report as one line of JSON.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

CANDIDATES = 32
TOKENS = 8


def matmul_rate(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """FLOP/s of an ``n``-cube matmul in ``dtype`` on this process's threads (the best of ``runs``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def bandwidth(mb: int = 256, runs: int = 5) -> float:
    """Bytes per second moved by a large copy (read plus write), the best of ``runs``."""
    src = np.ones(mb << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def profile_rerank(blip: Any, query: str, feats: list[Any], runs: int = 3) -> dict[str, Any]:
    """Self time per call and FLOPs by group over ``runs`` calls of ``blip.score``."""
    from torch.profiler import ProfilerActivity, profile

    patches = int(feats[0].shape[0])
    blip.score(query, feats)  # warm-up
    t0 = time.perf_counter()
    for _ in range(runs):
        blip.score(query, feats)
    wall_ms = (time.perf_counter() - t0) / runs * 1000
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(runs):
            blip.score(query, feats)
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "flop": 0.0, "calls": 0})
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.self_cpu_time_total <= 0:
            continue
        g = groups[_classify(ev.key, ev.input_shapes, patches, blip)]
        g["ms"] += ev.self_cpu_time_total / 1000 / runs
        g["flop"] += (ev.flops or 0) / runs
        g["calls"] += ev.count / runs
    profiled_ms = sum(g["ms"] for g in groups.values())
    return {"wall_ms": round(wall_ms, 1), "profiled_ms": round(profiled_ms, 1), "groups": dict(groups)}


def _classify(name: str, shapes: list[Any], patches: int, blip: Any) -> str:
    if name in ("aten::addmm", "aten::mm"):
        return "weight products"
    if name == "aten::bmm":
        dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple)) and s]
        if any(patches in d for d in dims):
            return "image attention"
        heads = int(blip.model.text_encoder.config.num_attention_heads)
        width = int(blip.model.text_encoder.config.encoder_hidden_size)
        if dims and dims[0][0] == heads and any(width in d for d in dims):
            return "weight products"  # Q W_k and (P X) W_v: the heads are the batch
        return "text attention"
    return name.replace("aten::", "")


def report(blip: Any, precision: str, label: str) -> dict[str, Any]:
    from PIL import Image

    from bench.engines import exact_query

    one = blip.vision_features([Image.new("RGB", (64, 64), (120, 80, 40))])[0]
    rng = np.random.default_rng(0)
    feats = [(one + rng.standard_normal(one.shape).astype(np.float16) * np.float16(0.1)).astype(np.float16)
             for _ in range(CANDIDATES)]
    query = exact_query(blip, TOKENS)
    got = profile_rerank(blip, query, feats)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = matmul_rate(dtype)
    bw = bandwidth()
    feature_bytes = sum(f.nbytes for f in feats)
    rows = []
    for name, g in sorted(got["groups"].items(), key=lambda kv: -kv[1]["ms"]):
        row = {"group": name, "ms": round(g["ms"], 2), "share": round(g["ms"] / max(got["profiled_ms"], 1e-9), 3),
               "calls": round(g["calls"])}
        if g["flop"]:
            achieved = g["flop"] / (g["ms"] / 1000) if g["ms"] else float("nan")
            row.update(gflop=round(g["flop"] / 1e9, 3), gflops=round(achieved / 1e9, 1),
                       of_matmul_rate=round(achieved / rate, 3))
        rows.append(row)
    return {"models": label, "precision": precision, "threads": torch.get_num_threads(), "candidates": CANDIDATES,
            "tokens": TOKENS, "wall_ms": got["wall_ms"], "profiled_ms": got["profiled_ms"],
            "matmul_2048_gflops": round(rate / 1e9, 1), "bandwidth_gb_s": round(bw / 1e9, 1),
            "feature_mb_per_query": round(feature_bytes / 1e6, 2),
            "memory_floor_ms": round(feature_bytes / bw * 1000, 3), "rows": rows}


def table(rep: dict[str, Any]) -> str:
    out = [f"{rep['models']}, torch {rep['precision']}, {rep['threads']} threads, {rep['candidates']} candidates x "
           f"{rep['tokens']} tokens: {rep['wall_ms']} ms a call ({rep['profiled_ms']} ms profiled); "
           f"{rep['precision']} 2048^3 matmul {rep['matmul_2048_gflops']} GFLOP/s; memory floor "
           f"{rep['memory_floor_ms']} ms ({rep['feature_mb_per_query']} MB at {rep['bandwidth_gb_s']} GB/s)",
           "", "| group | ms per call | share | calls | GFLOP | GFLOP/s | of matmul rate |", "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        out.append(f"| {r['group']} | {r['ms']} | {r['share']:.0%} | {r['calls']} | {r.get('gflop', '-')} | "
                   f"{r.get('gflops', '-')} | {r.get('of_matmul_rate', '-')} |")
    return "\n".join(out)


def profile_main(build: Path, models: str, precision: str, quick: bool) -> None:
    from engines.blip import TorchBlip

    if models == "tiny":
        from engines.tiny import make_tiny_models

        folder, label = make_tiny_models(build / "tiny")[1], "tiny BLIP"
    else:
        from engines.fullsize import make_fullsize_models

        folder, label = make_fullsize_models(build / "fullsize", which=("blip-base",))["blip-base"], "BLIP-base"
    blip = TorchBlip(str(folder), precision=precision)
    rep = report(blip, precision, label)
    print(table(rep))
    print(json.dumps(rep))

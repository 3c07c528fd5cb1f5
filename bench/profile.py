"""Where the reassociated rerank's time goes on this machine: ``python -m bench.engines --profile``.

One query of 8 tokens against 32 candidates' stored features (BLIP-base sized random weights, or the tiny model
with ``--models tiny``), torch at ``--precision`` (bf16, fp32 or int8), the worker's own pass (``TorchBlip.score``, its
features in the form the worker's feature source keeps them; ``--profile-pass main``: the pass as it was before
issue 26's cuts, ``bench.baseline.ReassociatedItmOnMain``, fed float16; ``--profile-pass compiled``: the worker's
pass as Inductor compiles it for ``engines/compiled.py``'s package, here through ``torch.compile`` at this call's
shapes, since a package's C++ calls its products past the profiler): ``torch.profiler`` over a few calls, each
op's self time per call, grouped:

- image attention: the two products over the image tokens per candidate (``(Q W_k) X^T`` and ``softmax . X``);
- weight products: every product with a weight matrix (the layers' Linear, on weights packed for oneDNN in bf16
  (``engines/packed.py``), ``Q W_k`` and ``(P X) W_v``);
- text attention: self-attention's products over the query's tokens;
- the rest by op (LayerNorm, softmax, GELU, copies, casts, adds, ...); in the compiled pass, Inductor's fused
  kernels by the ops each fuses (``compiled: _softmax_inductor_force_stride_order_transpose``, ...).

Achieved FLOP/s of each product group against this machine's rate for a 2048 x 2048 x 2048 matmul in the same dtype
(in torch int8 the integer products, groups marked ``(int8)``, against ``_int_mm``'s, whose ratio to fp32's says
how much an int8 pass can gain on this CPU at most): by the profiler's times (which the profiler itself inflates)
and by the call's unprofiled wall time shared out as the profile shares it (``gflops_wall``); and the memory floor:
the stored features one query reads (32 x 577 x 768, 2 bytes each) over the measured memory bandwidth (a large
copy's), with what the pass streams besides (the text tower's weights once, the features twice a layer) as a second
floor; and the compute floor: every product's FLOPs at the large-matmul rate, the time no pass doing the same
products in this dtype can beat. The last line is the report as one line of JSON.

On a 2-core AMD EPYC Zen 4 (avx512_bf16) in bf16 the pass took 387 ms a call against a floor of 271 ms (114 GFLOP
at 422 GFLOP/s), and the pass before issue 26's cuts 411 ms: a pass 1.4x faster than that one (294 ms) would run
the whole call at 92% of a 2048-cube matmul's rate. There the profiler also charged 34 to 70 ms a call to ``copy_``
(it varied from run to run) where timers around the same lines in an unprofiled call measured about 20 ms: read the
small ops' shares as upper bounds.

With more than one thread the profiler slows the small ops far more than the large products (on a 2-core Xeon:
200 ms a call unprofiled, 1,150 ms profiled), so the wall-based column overstates the products' rates there;
``OMP_NUM_THREADS=1 python -m bench.engines --profile ...`` gives shares the wall time agrees with (337 ms a
call, 417 ms profiled).
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

CANDIDATES = 32
TOKENS = 8
# what torch.compile's Python around a compiled graph records (an ahead-of-time package runs without it)
TORCH_COMPILE_EVENTS = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo", "Pregraph bytecode",
                        "AOTDispatcher")


def matmul_rate(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """FLOP/s of an ``n``-cube matmul in ``dtype`` on this process's threads (the best of ``runs``); int8: oneDNN's
    s8 x s8 to int32 (``torch._int_mm``, torch int8's product: engines/intmm.py), multiply-adds counted as two."""
    if dtype == torch.int8:  # the second operand laid out as the pass lays out its own (intmm.operand)
        from engines import intmm

        a, b = torch.randint(-63, 64, (n, n), dtype=torch.int8), intmm.operand(torch.randint(-63, 64, (n, n), dtype=torch.int8))
        mm = torch._int_mm
    else:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        mm = torch.mm
    mm(a, b)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        mm(a, b)
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
    """Self time per call and FLOPs by group over ``runs`` calls of ``blip.score``; the wall time per call is
    the median of ``2 * runs`` unprofiled calls."""
    from torch.profiler import ProfilerActivity, profile

    patches = int(feats[0].shape[0])
    blip.score(query, feats)  # warm-up
    times = []
    for _ in range(2 * runs):
        t0 = time.perf_counter()
        blip.score(query, feats)
        times.append(time.perf_counter() - t0)
    wall_ms = float(np.median(times)) * 1000
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        for _ in range(runs):
            blip.score(query, feats)
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "flop": 0.0, "calls": 0})
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.self_cpu_time_total <= 0:
            continue
        g = groups[_classify(ev.key, ev.input_shapes, patches, blip)]
        g["ms"] += ev.self_cpu_time_total / 1000 / runs
        g["flop"] += (ev.flops or _uncounted_flops(ev.key, ev.input_shapes) * ev.count) / runs
        g["calls"] += ev.count / runs
    profiled_ms = sum(g["ms"] for g in groups.values())
    return {"wall_ms": round(wall_ms, 1), "profiled_ms": round(profiled_ms, 1), "groups": dict(groups)}


def _uncounted_flops(name: str, shapes: list[Any]) -> int:
    """FLOPs of one call of a product the profiler does not count: oneDNN's on a packed weight (``engines/packed.py``:
    input rows x in x out, twice) and ``_int_mm`` (torch int8's, engines/intmm.py: M x K times K x N, twice)."""
    if name == "aten::_int_mm" and len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
        return 2 * int(shapes[0][0]) * int(shapes[0][1]) * int(shapes[1][1])
    if name != "mkldnn::_linear_pointwise" or len(shapes) < 2 or not shapes[0] or len(shapes[1]) != 2:
        return 0
    rows = int(np.prod(shapes[0][:-1]))
    return 2 * rows * int(shapes[1][0]) * int(shapes[1][1])


def _classify(name: str, shapes: list[Any], patches: int, blip: Any) -> str:
    fused = re.fullmatch(r"graph_\d+_cpp_fused_(.+?)(_\d+)?", name)
    if fused:  # one of Inductor's kernels, by the ops it fuses
        return f"compiled: {fused.group(1).strip('_')}"
    if name.startswith(TORCH_COMPILE_EVENTS):
        return "torch.compile's Python wrapper (a package has none)"
    dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple)) and s]
    if name == "aten::_int_mm":  # torch int8 (engines/intmm.py): over the image tokens, or a text layer's weight
        return f"{'image attention' if any(patches in d for d in dims) else 'weight products'} (int8)"
    if name in ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "imgsearch::linear", "imgsearch_native::packed_linear"):
        return "weight products"  # imgsearch*: the calls on a packed weight around oneDNN's (engines/packed.py)
    if name == "aten::bmm":
        if any(patches in d for d in dims):
            return "image attention"
        heads = int(blip.model.text_encoder.config.num_attention_heads)
        width = int(blip.model.text_encoder.config.encoder_hidden_size)
        if dims and dims[0][0] == heads and any(width in d for d in dims):
            return "weight products"  # Q W_k and (P X) W_v: the heads are the batch
        return "text attention"
    return name.replace("aten::", "")


def text_weight_bytes(blip: Any) -> int:
    """Bytes of the text tower's weights: what one ITM pass reads at least once."""
    return sum(p.numel() * p.element_size() for p in blip.model.text_encoder.parameters())


def report(blip: Any, precision: str, label: str, stored_form: bool = True) -> dict[str, Any]:
    from PIL import Image

    from bench.engines import exact_query

    one = blip.vision_features([Image.new("RGB", (64, 64), (120, 80, 40))])[0]
    rng = np.random.default_rng(0)
    feats = [(one + rng.standard_normal(one.shape).astype(np.float16) * np.float16(0.1)).astype(np.float16)
             for _ in range(CANDIDATES)]
    if stored_form:  # as the worker's feature source keeps them
        feats = [blip.stored_form(f) for f in feats]
    query = exact_query(blip, TOKENS)
    got = profile_rerank(blip, query, feats)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = matmul_rate(dtype)
    # torch int8: its float products (the per-head Q W_k and (P X) W_v, the text attention) at fp32's rate, its
    # integer ones (groups marked int8) at _int_mm's
    int8_rate = matmul_rate(torch.int8) if precision == "int8" else None
    bw = bandwidth()
    feature_bytes = sum(f.nbytes for f in feats)
    layers = len(blip.model.text_encoder.encoder.layer)
    streamed = text_weight_bytes(blip) + 2 * layers * feature_bytes
    to_wall = got["wall_ms"] / max(got["profiled_ms"], 1e-9)  # the profile's shares of the unprofiled call
    rows = []
    for name, g in sorted(got["groups"].items(), key=lambda kv: -kv[1]["ms"]):
        row = {"group": name, "ms": round(g["ms"], 2), "share": round(g["ms"] / max(got["profiled_ms"], 1e-9), 3),
               "calls": round(g["calls"])}
        if g["flop"]:
            own = int8_rate if int8_rate and name.endswith("(int8)") else rate
            achieved = g["flop"] / (g["ms"] / 1000) if g["ms"] else float("nan")
            at_wall = g["flop"] / (g["ms"] * to_wall / 1000) if g["ms"] else float("nan")
            row.update(gflop=round(g["flop"] / 1e9, 3), gflops=round(achieved / 1e9, 1),
                       of_matmul_rate=round(achieved / own, 3), gflops_wall=round(at_wall / 1e9, 1),
                       of_matmul_rate_wall=round(at_wall / own, 3))
        rows.append(row)
    products = sum(g["flop"] for g in got["groups"].values())
    integer = sum(g["flop"] for n, g in got["groups"].items() if n.endswith("(int8)"))
    floor_s = (products - integer) / rate + (integer / int8_rate if int8_rate else 0.0)
    extra = {} if int8_rate is None else {"int8_matmul_2048_gops": round(int8_rate / 1e9, 1),
                                          "int8_over_fp32_rate": round(int8_rate / rate, 3),
                                          "int8_product_gflop": round(integer / 1e9, 3)}
    return {"models": label, "precision": precision, "threads": torch.get_num_threads(), "candidates": CANDIDATES,
            "tokens": TOKENS, "wall_ms": got["wall_ms"], "profiled_ms": got["profiled_ms"],
            "matmul_2048_gflops": round(rate / 1e9, 1), "bandwidth_gb_s": round(bw / 1e9, 1),
            "feature_mb_per_query": round(feature_bytes / 1e6, 2),
            "memory_floor_ms": round(feature_bytes / bw * 1000, 3),
            "streamed_mb_per_query": round(streamed / 1e6, 1), "streamed_floor_ms": round(streamed / bw * 1000, 2),
            "product_gflop": round(products / 1e9, 3), "compute_floor_ms": round(floor_s * 1000, 3),
            **extra, "rows": rows}


def table(rep: dict[str, Any]) -> str:
    int8 = "int8_matmul_2048_gops" in rep
    rates = (f"fp32 2048^3 matmul {rep['matmul_2048_gflops']} GFLOP/s, int8 (_int_mm) {rep['int8_matmul_2048_gops']} "
             f"GOP/s ({rep['int8_over_fp32_rate']}x fp32's)" if int8 else
             f"{rep['precision']} 2048^3 matmul {rep['matmul_2048_gflops']} GFLOP/s")
    out = [f"{rep['models']}, torch {rep['precision']}, {rep['threads']} threads, {rep['candidates']} candidates x "
           f"{rep['tokens']} tokens: {rep['wall_ms']} ms a call ({rep['profiled_ms']} ms profiled); "
           f"{rates}; memory floor "
           f"{rep['memory_floor_ms']} ms ({rep['feature_mb_per_query']} MB of stored features at "
           f"{rep['bandwidth_gb_s']} GB/s); {rep['streamed_floor_ms']} ms with what the pass streams "
           f"({rep['streamed_mb_per_query']} MB: the text weights once, the features twice a layer); compute floor "
           f"{rep['compute_floor_ms']} ms ({rep['product_gflop']} GFLOP of products at the 2048^3 rate"
           + (f", the {rep['int8_product_gflop']} in int8 at _int_mm's" if int8 else "")
           + ": no pass in this dtype runs faster than that)",
           "", "| group | ms per call (profiled) | share | calls | GFLOP | GFLOP/s (profiled) | of matmul rate | "
           "GFLOP/s (wall) | of matmul rate (wall) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        out.append(f"| {r['group']} | {r['ms']} | {r['share']:.0%} | {r['calls']} | {r.get('gflop', '-')} | "
                   f"{r.get('gflops', '-')} | {r.get('of_matmul_rate', '-')} | {r.get('gflops_wall', '-')} | "
                   f"{r.get('of_matmul_rate_wall', '-')} |")
    return "\n".join(out)


def profile_main(build: Path, models: str, precision: str, quick: bool, which: str = "ours") -> None:
    """``which``: ours (the eager pass), compiled (ours as Inductor compiles it) or main (the pass before issue
    26's cuts)."""
    from engines.blip import TorchBlip

    if precision == "int8" and which != "ours":
        raise SystemExit("--precision int8 profiles ours: torch int8 runs eager, and main had no int8 pass")
    if models == "tiny":
        from engines.tiny import make_tiny_models

        folder, label = make_tiny_models(build / "tiny")[1], "tiny BLIP"
    else:
        from engines.fullsize import make_fullsize_models

        folder, label = make_fullsize_models(build / "fullsize", which=("blip-base",))["blip-base"], "BLIP-base"
    blip = TorchBlip(str(folder), precision=precision, compiled="off")
    if which == "compiled":
        # a built package's C++ calls oneDNN past the profiler, so its products record no event: torch.compile
        # lowers the same pass with the same Inductor (at this call's shapes) and, asked to, names its kernels
        blip.cores.rx.with_text = torch.compile(blip.cores.rx.with_text, dynamic=False,
                                                options={"cpp.enable_kernel_profile": True})
        label = f"{label}, compiled by Inductor"
    if which == "main":
        from bench.baseline import main_rerank

        blip, label = main_rerank(blip), f"{label}, the pass before issue 26's cuts"
    rep = report(blip, precision, label, stored_form=which != "main")
    print(table(rep))
    print(json.dumps(rep))

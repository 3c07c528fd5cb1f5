"""Should the rerank's image attention run in int8 on CPUs without bf16? Its two products (the scores over the 577
image tokens, and the probabilities times those tokens) are about half of the fp32 pass, and fp32 alone cannot
reach issue 26's 1.4x there. Measured here before anything is built:

- **quality**, on the model kit (trained weights): the torch fp32 rerank against the same pass with both products
  emulated in int8 (rounded in float, so exact sums: what an integer kernel gives where it does not saturate).
  Every image token gets its own scale (as ingest could store them), every row of the query's keys
  (``Q_h W_k,h``) its own, and the probabilities, the tokens' scales folded in, a scale per row. Several ranges
  per operand: on AVX2 ``vpmaddubsw`` adds u8 x s8 pairs in 16 bits, so the s8 side must be 7-bit (63) to be right;
  the image tokens at 63 can be that side in both products. The largest ITM difference and the fused top-10
  agreement over held-out queries, as ``tests/quality/test_bf16.py`` measures bf16 (bound 0.05, agreement 0.9);
- **speed**: ``torch._int_mm`` (oneDNN's s8 x s8) against fp32 and bf16 ``bmm`` for the scores product's shape (32
  candidates x 577 tokens x 768 by 768 x 96), on this CPU and, each in a process of its own, with oneDNN capped at
  AVX-512 VNNI and at AVX2 (``ONEDNN_MAX_CPU_ISA``; fp32 there still runs MKL's kernels for this CPU), with
  whether its full-range and 7-bit sums are exact under that cap.

    python -m bench.int8_attention            # 30 queries over 60 held-out images; 32 candidates (14 s here)
    python -m bench.int8_attention --quick    # 8 queries over 20 images; 8 candidates (8 s here)

The last line is JSON: ``{"quality": [...], "speed": {isa: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Any

import torch

from engines import intmm

LAYOUTS = [  # (image tokens, query keys, probabilities): the largest magnitude each is rounded to
    (127, 127, 255), (127, 63, 255), (127, 63, 63), (63, 127, 255)]
CAPS = ("AVX512_CORE_VNNI", "AVX2")


def _rounded(t: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` rounded to integers of magnitude at most ``top`` with a scale per row (its last axis), as float (the
    sums then exact), and the scales: ``intmm.rounded``'s integers, unshifted."""
    q, scale = intmm.rounded(t.float(), top)
    return q.float() + (128 if top > 127 else 0), scale


def _emulated(tokens: int, keys: int, probs: int) -> Any:
    """A ``ReassociatedItm._cross_attention`` for one instance whose two products with the image tokens are
    emulated in int8 at these ranges; the rest of the layer is the pass's own (its value fold and output)."""
    def cross(rx: Any, layer: Any, a: torch.Tensor, qk: torch.Tensor, x: torch.Tensor, index: int = 0,
              _rounded_once: Any = None) -> torch.Tensor:  # None: the engine is fp32
        xq, sx = _rounded(x, tokens)                                                   # B x P x E, B x P x 1
        kq, sk = _rounded(qk, keys)                                                    # B x HR x E, B x HR x 1
        scores = torch.bmm(xq, kq.transpose(1, 2)) * sx * sk.transpose(1, 2)           # B x P x HR
        p = torch.softmax(scores, dim=1).transpose(1, 2) * sx.transpose(1, 2)          # the tokens' scales folded in
        pq, sp = _rounded(p, probs)
        return rx._attend(layer, a, torch.bmm(pq, xq) * sp, index)                    # B x HR x E
    return cross


def quality(queries: int, images: int) -> list[dict[str, Any]]:
    from engines.blip import TorchBlip
    from engines.kit import KIT_DIR
    from engines.kit.evaluate import agreement, held_out

    gallery = held_out(images)
    ref, emu = TorchBlip(str(KIT_DIR / "blip")), TorchBlip(str(KIT_DIR / "blip"))
    feats = list(ref.vision_features(gallery.images))
    rows = []
    for tokens, keys, probs in LAYOUTS:
        emu.cores.rx._cross_attention = types.MethodType(_emulated(tokens, keys, probs), emu.cores.rx)
        diff, overlap = agreement(ref, emu, gallery.queries[:queries], feats)
        rows.append({"tokens": tokens, "keys": keys, "probs": probs, "itm_max_diff": round(diff, 4),
                     "top10_agreement": round(overlap, 3), "right_on_avx2": tokens <= 63})
    return rows


def products(candidates: int, rounds: int) -> dict[str, Any]:
    """This process's rates (GFLOP/s, integer operations counted as FLOPs) for the scores product's shape, and
    whether ``_int_mm`` gives exact sums on full-range and on 7-bit s8 operands."""
    torch.manual_seed(0)
    p, e, c = 577, 768, 96
    x, k = torch.randn(candidates, p, e), torch.randn(candidates, c, e)
    xb, kb = x.bfloat16(), k.bfloat16()
    xi = torch.randint(-127, 128, (candidates, p, e), dtype=torch.int8)
    ki = torch.randint(-127, 128, (candidates, e, c), dtype=torch.int8)
    calls = {"fp32": lambda: torch.bmm(x, k.transpose(1, 2)), "bf16": lambda: torch.bmm(xb, kb.transpose(1, 2)),
             "int8": lambda: [torch._int_mm(xi[i], ki[i]) for i in range(candidates)]}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    flop = 2 * candidates * p * e * c
    out: dict[str, Any] = {f"{n}_gflops": round(flop / statistics.median(t) / 1e9, 1) for n, t in times.items()}
    out["int8_over_fp32"] = round(out["int8_gflops"] / out["fp32_gflops"], 2)
    for name, top in (("exact_full_range", 127), ("exact_7bit", 63)):
        a = torch.randint(-127, 128, (p, e), dtype=torch.int8)
        b = torch.randint(-top, top + 1, (e, c), dtype=torch.int8)
        out[name] = bool(torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--products-only", action="store_true", help=argparse.SUPPRESS)  # one capped child's run
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    candidates, rounds = (8, 5) if args.quick else (32, 20)
    if args.products_only:
        print(json.dumps(products(candidates, rounds)))
        return
    speed = {"native": products(candidates, rounds)}
    for cap in CAPS:  # a process of its own: oneDNN reads the cap once
        child = subprocess.run([sys.executable, "-m", "bench.int8_attention", "--products-only", "--threads",
                                str(args.threads), *(["--quick"] if args.quick else [])],
                               env={**os.environ, "ONEDNN_MAX_CPU_ISA": cap}, capture_output=True, text=True,
                               timeout=600, check=True)
        speed[cap] = json.loads(child.stdout.strip().splitlines()[-1])
    for isa, row in speed.items():
        print(f"# {isa}: scores product ({candidates} candidates) fp32 {row['fp32_gflops']}, bf16 {row['bf16_gflops']}, "
              f"int8 {row['int8_gflops']} GFLOP/s ({row['int8_over_fp32']}x fp32); int8 sums exact: full range "
              f"{row['exact_full_range']}, 7-bit {row['exact_7bit']}", flush=True)
    queries, images = (8, 20) if args.quick else (30, 60)
    rows = quality(queries, images)
    for r in rows:
        print(f"# image tokens {r['tokens']}, keys {r['keys']}, probabilities {r['probs']}: largest ITM difference "
              f"{r['itm_max_diff']}, top-10 agreement {r['top10_agreement']} ({queries} queries over {images} "
              f"images){'; right on AVX2' if r['right_on_avx2'] else ''}", flush=True)
    print(json.dumps({"quality": rows, "speed": speed}))


if __name__ == "__main__":
    main()

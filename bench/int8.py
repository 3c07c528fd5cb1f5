"""int8 quantization recipes side by side: agreement with fp32 and speed, on this CPU and on an emulated AVX2 one.

For each recipe (engines/artifacts.py ``RECIPES``):
- the model kit (trained weights): the ONNX Runtime int8 text vectors' cosine to torch fp32 over the held-out
  queries, the largest ITM difference and the fused top-10 agreement of the rerank over a held-out gallery;
- the full-size SigLIP 2 text tower (random weights, the real widths): cosine to torch fp32 and latency at
  batch 1 and 16 (full mode only);
- every int8 graph's self-check probe (engines/selfcheck.py) run natively and under ``qemu-x86_64 -cpu
  Haswell`` (AVX2, no VNNI: the kernels that saturate), where qemu-user is installed; in full mode also the
  full-size text tower's;
- ONNX Runtime's product kernels on this CPU (``kernels``): one weight product of the rerank's shape (264 rows,
  768 x 3072) in fp32 and dynamically quantized with uint8 and with int8 weights, in GFLOP/s (integer operations
  counted as FLOPs): where int8 pays without VNNI, and by how much (``auto`` times it on every CPU without bf16).

    python -m bench.int8 --quick   # the kit only, the old recipe against the chosen one; under a minute here,
                                   # plus about a minute per recipe under the emulator
    python -m bench.int8           # every recipe, the kit and the full-size text tower

The last line is JSON: ``{"chosen", "recipes": {name: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.artifacts import INT8_RECIPE, RECIPES
from engines.blip import TorchBlip
from engines.export import build_onnx
from engines.kit.evaluate import agreement, held_out
from engines.ort import OrtBlip, OrtSiglip
from engines.siglip import TorchSiglip

KIT = Path(__file__).resolve().parents[1] / "engines" / "kit" / "models"
OLD = "s8"  # what engines/export.py quantized with before the recipe was chosen


def _kit(recipe: str, engines: Path, ref: tuple[TorchSiglip, TorchBlip], queries: list[str],
         feats: list[np.ndarray]) -> dict[str, Any]:
    build_onnx(str(KIT / "siglip"), str(KIT / "blip"), engines, precisions=("fp32", "int8"), recipe=RECIPES[recipe])
    s = OrtSiglip(str(KIT / "siglip"), engines, precision="int8", recipe=recipe)
    b = OrtBlip(str(KIT / "blip"), engines, precision="int8", recipe=recipe)
    cos = (ref[0].encode_text(queries) * s.encode_text(queries)).sum(1)
    itm_diff, overlap = agreement(ref[1], b, queries, feats)
    return {"kit_text_cos_min": round(float(cos.min()), 5), "kit_text_cos_mean": round(float(cos.mean()), 5),
            "kit_itm_max_diff": round(itm_diff, 5), "kit_top10_agreement": round(overlap, 4)}


def _fullsize(recipe: str, root: Path, texts: list[str]) -> dict[str, Any]:
    from engines.fullsize import make_fullsize_models

    folder = make_fullsize_models(root / "models", which=("siglip",), siglip_vocab=32_000)["siglip"]  # made once
    engines = root / "engines"
    build_onnx(str(folder), str(folder), engines, precisions=("fp32", "int8"), components=("siglip_text",),
               recipe=RECIPES[recipe])
    ref = TorchSiglip(str(folder)).encode_text(texts)
    s = OrtSiglip(str(folder), engines, precision="int8", components=("siglip_text",), recipe=recipe)
    out = {"full_text_cos_min": round(float((ref * s.encode_text(texts)).sum(1).min()), 5)}
    for batch in (1, 16):
        batch_texts = (texts * 16)[:batch]
        s.encode_text(batch_texts)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            s.encode_text(batch_texts)
            times.append((time.perf_counter() - t0) * 1000)
        out[f"full_text_ms_b{batch}"] = round(statistics.median(times), 2)
    return out


def _probes(folder: Path, recipe: str, emulate: str | None) -> dict[str, Any]:
    """Every int8 graph of ``recipe`` under ``folder`` through its probe, natively or under qemu-user emulating
    ``emulate``."""
    cmd = [sys.executable, "-m", "engines.selfcheck", str(folder), recipe]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    key = f"probe_{emulate.lower() if emulate else 'native'}"
    return {f"{key}_cos_min": min(r["cosine"] for r in rows), f"{key}_itm_max_diff": max(r["itm_diff"] for r in rows),
            f"{key}_refused": sorted(r["graph"].split("/")[1].split(".")[0] for r in rows if not r["ok"])}


def kernels(rows: int = 264, inner: int = 768, cols: int = 3072, runs: int = 20) -> dict[str, float]:
    """GFLOP/s of ONNX Runtime's fp32 MatMul and of its DynamicQuantizeMatMul with uint8 and int8 weights (U8U8,
    U8S8 kernels) for one product, on this process's threads: the median of ``runs`` after a warm-up."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner)).astype(np.float32)
    weights = {"fp32": rng.standard_normal((inner, cols)).astype(np.float32),
               "u8u8": rng.integers(0, 256, (inner, cols)).astype(np.uint8),
               "u8s8": rng.integers(-64, 64, (inner, cols)).astype(np.int8)}  # 7-bit, as s8-rr builds them
    rates: dict[str, float] = {}
    for name, w in weights.items():
        inits = [numpy_helper.from_array(w, "w")]
        if name == "fp32":
            node = helper.make_node("MatMul", ["a", "w"], ["y"])
        else:
            inits += [numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
                      numpy_helper.from_array(np.array(128 if w.dtype == np.uint8 else 0, w.dtype), "zero")]
            node = helper.make_node("DynamicQuantizeMatMul", ["a", "w", "scale", "zero"], ["y"], domain="com.microsoft")
        graph = helper.make_graph([node], name, [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        sess.run(None, {"a": a})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, {"a": a})
            times.append(time.perf_counter() - t0)
        rates[name] = round(2 * rows * inner * cols / statistics.median(times) / 1e9, 1)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recipes", default="", help="comma-separated names (default: all; --quick: the old and the chosen)")
    ap.add_argument("--no-emulate", action="store_true", help="skip the AVX2 emulation even where qemu-user exists")
    ap.add_argument("--out", type=Path, default=Path("build/int8"))
    args = ap.parse_args()
    names = args.recipes.split(",") if args.recipes else ([OLD, INT8_RECIPE.name] if args.quick else list(RECIPES))
    emulate = None if args.no_emulate or not shutil.which("qemu-x86_64") else "Haswell"
    gallery = held_out(24 if args.quick else 60)
    queries = gallery.queries[: 8 if args.quick else 30]
    ref = TorchSiglip(str(KIT / "siglip")), TorchBlip(str(KIT / "blip"))
    feats = list(ref[1].vision_features(gallery.images))
    cpu = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512_vnni", "avx_vnni",
                                                                                 "avx512_bf16", "amx_int8")})
    print(f"# CPU flags: {' '.join(cpu)}; emulated: {emulate or 'no'}", flush=True)
    rates = kernels()
    print(f"# ONNX Runtime products here, GFLOP/s: fp32 {rates['fp32']}, uint8 x uint8 {rates['u8u8']} "
          f"({rates['u8u8'] / rates['fp32']:.2f}x), uint8 x int8 {rates['u8s8']} ({rates['u8s8'] / rates['fp32']:.2f}x)",
          flush=True)
    report: dict[str, Any] = {}
    for name in names:
        # one folder for every recipe: fp32 and the probes are built once, each recipe's int8 graphs by name
        row = _kit(name, args.out / "kit", ref, queries, feats)
        row |= _probes(args.out / "kit", name, None)
        if emulate:
            row |= _probes(args.out / "kit", name, emulate)
        if not args.quick:
            row |= _fullsize(name, args.out / "full", queries)
            if emulate:  # the full-size text tower's probe on the emulated AVX2 CPU
                row |= {f"full_{k}": v for k, v in _probes(args.out / "full" / "engines", name, emulate).items()}
        report[name] = row
        print(json.dumps({"recipe": name, **row}), flush=True)
    print(json.dumps({"chosen": INT8_RECIPE.name, "cpu": cpu, "kernels": rates, "recipes": report}))


if __name__ == "__main__":
    main()

"""Engine speed on this machine, every backend side by side in one run, with the ratio to torch fp32.

Rows: SigLIP text latency at batch 1 and 16, SigLIP image throughput at batch 16, BLIP rerank of one query
with 32 candidates from stored features, and the original's way of reranking (BLIP vision tower on each
candidate's pixels, then the text encoder once per candidate) for comparison.

Then the rerank table: full-size BLIP-base and BLIP-large, each backend with the reassociated cross-attention
(``IMGSEARCH_BLIP_CROSS_ATTENTION=auto``) and without it (``plain``), for queries of 8, 16, 32 and 64 tokens and
32 and 128 candidates; each backend in a fresh process, both ways in the same process, alternating.

    python -m bench.engines --quick   # tiny models only, the rerank at 8 tokens x 32 candidates on torch (under a
                                      # minute on a fresh clone); last line: rerank_speedup_8tok=<best with the
                                      # rewrite / best without it>
    python -m bench.engines --quick --rerank-only --models base   # BLIP-base's rerank, 8 tokens x 32 candidates
    python -m bench.engines           # the full tables on full-size random-weight models
    python -m bench.engines --profile [--models base] [--precision bf16|fp32|int8] [--profile-pass compiled|main]   # where
                                      # the reassociated rerank's time goes, per op, against this machine's
                                      # large-matmul rate (compiled: the pass as Inductor compiles it; main:
                                      # the pass before issue 26's cuts)

Full-size models are random-weight models of the real architectures (engines/fullsize.py): same cost as
the real checkpoints. They and their ONNX exports are built into ``build/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engines.artifacts import BLIP_COMPONENTS, SIGLIP_COMPONENTS
from engines.auto import torch_cpu_precision
from engines.blip import BlipBase, TorchBlip
from engines.export import build_onnx
from engines.ort import OrtBlip, OrtSiglip
from engines.siglip import SiglipBase, TorchSiglip

BACKENDS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
GPU_BACKENDS = (("torch", "fp32"), ("torch", "fp16"), ("onnxruntime", "fp32"), ("tensorrt", "fp16"))
DEVICE = "cpu"
QUERIES = ["a surprised pikachu face", "a confused cat looking at a computer", "two dogs on a beach at sunset",
           "a red car", "a meme about mondays", "a screenshot of a tweet", "a drawing of a frog", "an astronaut"]


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(n)]


def siglip(backend: str, precision: str, folder: Path, engines: Path, text_only: bool) -> SiglipBase:
    if backend == "torch":
        return TorchSiglip(str(folder), precision=precision, device=DEVICE)
    if backend == "tensorrt":
        from engines.trt import TrtSiglip

        return TrtSiglip(str(folder), engines, precision=precision)
    parts = ("siglip_text",) if text_only else ("siglip_text", "siglip_image")
    return OrtSiglip(str(folder), engines, precision=precision, components=parts, device=DEVICE)


def blip(backend: str, precision: str, folder: Path, engines: Path) -> BlipBase:
    if backend == "torch":
        return TorchBlip(str(folder), precision=precision, device=DEVICE)
    if backend == "tensorrt":
        from engines.trt import TrtBlip

        return TrtBlip(str(folder), engines, precision=precision)
    return OrtBlip(str(folder), engines, precision=precision, device=DEVICE)


def ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def on_this_cpu(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``pairs`` without torch bf16 where this CPU has no native bf16 (there it would take hours, not minutes)."""
    if torch_cpu_precision() == "bf16":
        return pairs
    print("torch bf16 skipped: this CPU has no native bf16")
    return tuple(p for p in pairs if p != ("torch", "bf16"))


def backends(models: dict[str, Path], engines: Path) -> tuple[tuple[str, str], ...]:
    """The CPU set (torch bf16 only where native), or on a GPU: torch fp32/fp16, then ONNX Runtime's CUDA
    provider and TensorRT fp16 where they are installed (a CPU-only onnxruntime would silently run on the host's
    cores: it is left out)."""
    if DEVICE == "cpu":
        return on_this_cpu(BACKENDS)
    chosen = list(GPU_BACKENDS[:2])
    if ort_cuda():
        chosen.append(GPU_BACKENDS[2])
    else:
        print("onnxruntime skipped: no CUDAExecutionProvider in this onnxruntime (needs onnxruntime-gpu)")
    try:
        from engines.build import build_all

        build_all(SiglipBase(str(models["siglip"])), BlipBase(str(models["blip"])), engines, "fp16")
        chosen.append(GPU_BACKENDS[3])
    except Exception as exc:  # no tensorrt there: report the rest
        print(f"tensorrt skipped: {type(exc).__name__}: {exc}")
    return tuple(chosen)


def needs_onnx() -> bool:
    if DEVICE == "cpu" or ort_cuda():
        return True
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def original_way(model: TorchBlip, query: str, imgs: list[Image.Image]) -> None:
    """The original's rerank: per candidate, the vision tower on its pixels, then the text side (ITM and ITC)."""
    ids, mask = (torch.from_numpy(x).to(model.device) for x in model.query_inputs(query))
    with torch.inference_mode():
        for im in imgs:
            embeds = model.cores.vision(model.pixels([im]).to(model.device))
            model.cores.itm(ids, mask, embeds)
            model.cores.itc(ids, mask)


def measure(backend: str, precision: str, models: dict[str, Path], engines: Path, *, text_only: bool, repeat: int,
            feats_file: Path | None, device: str) -> dict[str, Any]:
    """One backend's row. Runs in a fresh process, so no other backend's models or thread pools are around."""
    global DEVICE
    DEVICE = device
    feats = list(np.load(feats_file)) if feats_file is not None else []
    row: dict[str, Any] = {"backend": backend, "precision": precision}
    s = siglip(backend, precision, models["siglip"], engines, text_only)
    row["siglip_text_b1_ms"] = timed(lambda: s.encode_text(QUERIES[:1]), repeat * 4, warmup=3)
    row["siglip_text_b16_ms"] = timed(lambda: s.encode_text((QUERIES * 2)[:16]), repeat, warmup=1)
    if not text_only:
        imgs16 = images(16)
        ms = timed(lambda: s.encode_images(imgs16), max(1, repeat // 3), warmup=1)
        row["siglip_image_b16_img_per_s"] = 16 / (ms / 1000)
        b = blip(backend, precision, models["blip"], engines)
        row["blip_rerank_32_ms"] = timed(lambda: b.score(QUERIES[0], feats), repeat, warmup=1)
    return row


def run(models: dict[str, Path], engines: Path, *, text_only: bool, repeat: int, label: str) -> list[dict[str, Any]]:
    parts = ("siglip_text",) if text_only else SIGLIP_COMPONENTS + BLIP_COMPONENTS  # every graph a version needs
    if needs_onnx():  # int8 is a CPU precision: the GPU runs fp32 exports (TensorRT builds fp16 from them)
        precisions = ("fp32", "int8") if DEVICE == "cpu" else ("fp32",)
        build_onnx(str(models["siglip"]), str(models["blip"]), engines, precisions=precisions, components=parts)
    engines.mkdir(parents=True, exist_ok=True)
    feats_file = None
    if not text_only:  # 32 candidates' stored features, as ingest writes them
        one = TorchBlip(str(models["blip"])).vision_features(images(1))[0]
        feats_file = engines / f"bench-feats-{label.replace(' ', '-')}.npy"
        np.save(feats_file, np.stack([one + np.float16(0.01) * i for i in range(32)]))
    chosen = backends(models, engines)
    rows = []
    for b, p in chosen:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            row = pool.submit(measure, b, p, models, engines, text_only=text_only, repeat=repeat,
                              feats_file=feats_file, device=DEVICE).result()
        rows.append({"models": label, **row})
    if not text_only:
        base = TorchBlip(str(models["blip"]), device=DEVICE)
        imgs32 = images(32, seed=1)
        ms = timed(lambda: original_way(base, QUERIES[0], imgs32), 1, warmup=0)
        rows.append({"models": label, "backend": "original way (torch fp32)", "precision": "fp32",
                     "blip_rerank_32_ms": ms})
    return rows


# --- the rerank table: with and without the reassociated cross-attention ---
RERANK_BACKENDS = (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
GPU_RERANK_BACKENDS = (("torch", "fp32"), ("torch", "fp16"), ("tensorrt", "fp16"))


def exact_query(blip: BlipBase, tokens: int) -> str:
    """A query that tokenizes to exactly ``tokens`` ids ([CLS] and [SEP] included)."""
    words = [w for w in ("red", "blue", "green", "circle", "square", "small") if len(blip.tokenizer.tokenize(w)) == 1]
    query = " ".join(words[i % len(words)] for i in range(tokens - 2))
    assert blip.query_inputs(query)[0].shape[1] == tokens, (tokens, blip.query_inputs(query)[0].shape)
    return query


def rerank_times(backend: str, precision: str, folder: Path, engines: Path, feats_file: Path, lengths: tuple[int, ...],
                 counts: tuple[int, ...], device: str) -> list[dict[str, Any]]:
    """One backend's rerank rows, in a fresh process: for each length and candidate count, the median time of
    ``score`` with the rewrite (auto) and without it (plain), timed alternately so both see the same machine."""
    global DEVICE
    DEVICE = device
    stored = np.load(feats_file)
    made = {}
    for mode in ("auto", "plain"):
        if backend == "torch":
            made[mode] = TorchBlip(str(folder), precision=precision, device=device, max_tokens=64, cross_attention=mode)
        elif backend == "tensorrt":
            from engines.trt import TrtBlip

            made[mode] = TrtBlip(str(folder), engines, precision=precision, max_tokens=64, cross_attention=mode)
        else:
            made[mode] = OrtBlip(str(folder), engines, precision=precision, device=device, max_tokens=64,
                                 cross_attention=mode)
    rows = []
    for n in counts:
        feats = list(stored[np.arange(n) % len(stored)])
        for tokens in lengths:
            query = exact_query(made["auto"], tokens)
            times: dict[str, list[float]] = {"auto": [], "plain": []}
            repeat = 3 if n <= 32 else 1
            if n == counts[0]:
                for mode in ("auto", "plain"):
                    made[mode].score(query, feats)  # warm-up: first-run allocations, lazy sessions
            for _ in range(repeat):
                for mode in ("auto", "plain"):
                    t0 = time.perf_counter()
                    made[mode].score(query, feats)
                    times[mode].append((time.perf_counter() - t0) * 1000)
            rows.append({"backend": backend, "precision": precision, "tokens": tokens, "candidates": n,
                         "rewrite": made["auto"].reassociates(tokens),
                         "with_ms": statistics.median(times["auto"]), "without_ms": statistics.median(times["plain"])})
    return rows


def rerank_table_rows(folder: Path, engines: Path, label: str, lengths: tuple[int, ...], counts: tuple[int, ...],
                      backends: tuple[tuple[str, str], ...] | None = None) -> list[dict[str, Any]]:
    chosen = backends or (on_this_cpu(RERANK_BACKENDS) if DEVICE == "cpu" else GPU_RERANK_BACKENDS)
    if DEVICE == "cpu":
        ort = sorted({p for b, p in chosen if b == "onnxruntime"})
        if ort:
            build_onnx(str(folder), str(folder), engines, precisions=tuple(ort), components=BLIP_COMPONENTS)
    else:
        try:  # TensorRT plans of BLIP's text side, where tensorrt is installed
            from engines.build import blip_profiles, build_plans

            build_onnx(str(folder), str(folder), engines, precisions=("fp32",))
            blip = BlipBase(str(folder), max_tokens=64)
            profiles = {c: p for c, p in blip_profiles(blip).items() if c != "blip_vision"}
            build_plans(profiles, dict.fromkeys(profiles, blip.version), engines, "fp16")
        except Exception as exc:  # no tensorrt there: the rest
            print(f"tensorrt skipped: {type(exc).__name__}: {exc}")
            chosen = chosen[:2]
    one = TorchBlip(str(folder)).vision_features(images(4))
    engines.mkdir(parents=True, exist_ok=True)
    feats_file = engines / f"rerank-feats-{label.replace(' ', '-')}.npy"
    np.save(feats_file, np.concatenate([one + np.float16(0.01) * i for i in range(8)]))
    rows = []
    for b, p in chosen:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            got = pool.submit(rerank_times, b, p, folder, engines, feats_file, lengths, counts, DEVICE).result()
        rows += [{"models": label, **r} for r in got]
        print(rerank_table([{"models": label, **r} for r in got]), flush=True)  # as it goes: a long run's partial
    return rows


def rerank_table(rows: list[dict[str, Any]]) -> str:
    out = ["| models | backend | tokens | candidates | rewrite used | with (ms) | without (ms) | speedup |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['models']} | {r['backend']} {r['precision']} | {r['tokens']} | {r['candidates']} | "
                   f"{'yes' if r['rewrite'] else 'no'} | {r['with_ms']:.0f} | {r['without_ms']:.0f} | "
                   f"{r['without_ms'] / r['with_ms']:.2f}x |")
    return "\n".join(out)


def best_speedup(rows: list[dict[str, Any]], models: str, tokens: int = 8, candidates: int = 32) -> tuple[float, str]:
    """The best backend with the rewrite against the best backend without it, for one shape."""
    at = [r for r in rows if r["models"] == models and r["tokens"] == tokens and r["candidates"] == candidates]
    best_with = min(at, key=lambda r: r["with_ms"])
    best_without = min(at, key=lambda r: r["without_ms"])
    return best_without["without_ms"] / best_with["with_ms"], (
        f"with: {best_with['backend']} {best_with['precision']} {best_with['with_ms']:.0f} ms; without: "
        f"{best_without['backend']} {best_without['precision']} {best_without['without_ms']:.0f} ms")


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("siglip_text_b1_ms", "SigLIP text b1 (ms)"), ("siglip_text_b16_ms", "SigLIP text b16 (ms)"),
            ("siglip_image_b16_img_per_s", "SigLIP image b16 (img/s)"), ("blip_rerank_32_ms", "BLIP rerank 32 (ms)")]
    out = ["| models | backend | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        base = next((b for b in rows if b["models"] == r["models"] and b["backend"] == "torch" and b["precision"] == "fp32"), r)
        cells = []
        for key, _ in cols:
            if key not in r:
                cells.append("-")
                continue
            v, ref = r[key], base.get(key)
            higher_better = key.endswith("per_s")
            ratio = (v / ref if higher_better else ref / v) if ref else None
            cells.append(f"{v:.1f}" + (f" ({ratio:.2f}x)" if ratio else ""))
        name = r["backend"] if r["backend"].startswith("original") else f"{r['backend']} {r['precision']}"
        out.append(f"| {r['models']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU table")
    ap.add_argument("--rerank-only", action="store_true", help="only the rerank table (with and without the rewrite)")
    ap.add_argument("--rerank-backends", default=None,
                    help="backend:precision,... for the rerank table (default: all of this device's)")
    ap.add_argument("--large-lengths", default="8,16,32,64", help="query lengths for BLIP-large's rows")
    ap.add_argument("--large-counts", default="32,128", help="candidate counts for BLIP-large's rows")
    ap.add_argument("--models", choices=("tiny", "base", "full"), default=None,
                    help="the rerank table's BLIP: tiny (--quick's), base (BLIP-base) or full (BLIP-base and "
                         "BLIP-large, the default)")
    ap.add_argument("--profile", action="store_true",
                    help="only the per-op profile of the reassociated rerank (torch.profiler), with achieved FLOP/s")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16", "int8"),
                    help="--profile's torch precision, fp32, bf16 or int8 (default: bf16 where this CPU has it "
                         "natively, else fp32; int8's integer products are rated against _int_mm's 2048^3 rate)")
    ap.add_argument("--profile-pass", choices=("ours", "compiled", "main"), default="ours",
                    help="--profile's pass: ours, ours as Inductor compiles it (the compiled rerank's lowering, "
                         "through torch.compile), or main (as it was before issue 26's cuts, bench/baseline.py)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    models = args.models or ("tiny" if args.quick else "full")

    from engines.fullsize import make_fullsize_models
    from engines.tiny import make_tiny_models

    if args.profile:
        from bench.profile import profile_main

        profile_main(args.build, models if models != "full" else "base", args.precision or torch_cpu_precision(),
                     args.quick, args.profile_pass)
        return
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    tiny_s, tiny_b = make_tiny_models(args.build / "tiny")
    if not args.rerank_only:
        rows = run({"siglip": tiny_s, "blip": tiny_b}, args.build / "engines", text_only=False,
                   repeat=min(args.repeat, 3) if args.quick else args.repeat, label="tiny")
        if not args.quick:
            full = make_fullsize_models(args.build / "fullsize", which=("siglip", "blip"))
            rows += run(full, args.build / "engines", text_only=False, repeat=args.repeat, label="full-size")
    # the rerank table: the reassociated cross-attention against the plain pass
    blips = {"tiny": ("tiny",), "base": ("blip-base",), "full": ("blip-base", "blip")}[models]
    made = {"tiny": tiny_b} if models == "tiny" else make_fullsize_models(args.build / "fullsize", which=blips)
    lengths, counts = ((8,), (32,)) if args.quick else ((8, 16, 32, 64), (32, 128))
    picked = tuple(tuple(b.split(":")) for b in args.rerank_backends.split(",")) if args.rerank_backends else \
        ((("torch", "fp32"),) if args.quick and DEVICE == "cpu" else None)
    rr: list[dict[str, Any]] = []
    for name in blips:
        label = {"tiny": "tiny BLIP", "blip-base": "BLIP-base", "blip": "BLIP-large"}[name]
        if name == "blip" and not args.quick:
            lengths = tuple(int(x) for x in args.large_lengths.split(","))
            counts = tuple(int(x) for x in args.large_counts.split(","))
        rr += rerank_table_rows(made[name], args.build / "engines", label, lengths, counts, picked)  # type: ignore[arg-type]
    where = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; {time.perf_counter() - t0:.0f} s in all")
    if rows:
        print(table(rows))
        print()
    print(rerank_table(rr))
    first = rr[0]["models"]
    speedup, how = best_speedup(rr, first)
    print(f"# best backend with the rewrite against the best without it, {first}, 8 tokens, 32 candidates: {how}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"engines": rows, "rerank": rr}, indent=2))
    print(f"rerank_speedup_8tok={speedup:.2f}")


if __name__ == "__main__":
    main()

"""The rerank of 32 candidates for an 8-token query: today's pass against the one before issue 26's cuts, in one
process, timed alternately (so both see the same machine, whatever else runs on it).

- ours: ``TorchBlip.score`` as the worker runs it, its candidates' features as the worker's feature source
  keeps them (``stored_form``: bfloat16 in bf16);
- main: the pass as it was (``bench.baseline.ReassociatedItmOnMain``), fed float16 features as the cache held
  them then (converted every query);
- unpacked (where ours packs its linear weights for oneDNN: bf16 on a CPU, ``engines/packed.py``): ours on its
  plain weights, so the line after the first gives what packing them pays.

    python -m bench.rerank                    # BLIP-base (random full-size weights), torch bf16 (fp32 on a CPU
                                              # without native bf16), 15 pairs
    python -m bench.rerank --quick            # the tiny model, a few pairs (seconds)
    python -m bench.rerank --precision fp32 --threads 1
    python -m bench.rerank --device cuda --precision fp16   # on a GPU
    python -m bench.rerank --compiled         # also ours compiled for this host (engines/compiled.py)
    python -m bench.rerank --precision int8   # ours in torch int8 (engines/intmm.py) against main's fp32 pass
    python -m bench.rerank --backend onnxruntime   # ours on ONNX Runtime int8 (its graphs built first) against
                                                   # main's torch pass in fp32
    python -m bench.rerank --backend onnxruntime --profile   # and ONNX Runtime's per-operator profile of ours

Each pair's wall time and this process's CPU time (all threads) are recorded; the last line is
``rerank_speedup=<main's median wall time / ours>`` (ours compiled, with ``--compiled``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines import compiled
from engines.auto import torch_cpu_precision
from engines.blip import TorchBlip

CANDIDATES = 32
TOKENS = 8


def _models(build: Path, models: str) -> tuple[Path, str]:
    if models == "tiny":
        from engines.tiny import make_tiny_models

        return make_tiny_models(build / "tiny")[1], "tiny BLIP"
    from engines.fullsize import make_fullsize_models

    return make_fullsize_models(build / "fullsize", which=("blip-base",))["blip-base"], "BLIP-base (random full-size weights)"


def _ours(folder: Path, precision: str, device: str, backend: str, build: Path) -> Any:
    """The engine timed as ours: torch eager, or ONNX Runtime on graphs built under ``build/engines`` first."""
    if backend == "torch":
        return TorchBlip(str(folder), precision=precision, device=device, compiled="off")
    from engines.artifacts import BLIP_COMPONENTS
    from engines.export import build_onnx
    from engines.ort import OrtBlip

    engines = build / "engines"
    build_onnx(str(folder), str(folder), engines, precisions=tuple(dict.fromkeys(("fp32", precision))),
               components=BLIP_COMPONENTS)  # only what is missing
    return OrtBlip(str(folder), engines, precision=precision, device=device)


def ort_profile(ours: Any, query: str, stored: list[Any], runs: int) -> dict[str, float]:
    """ONNX Runtime's own per-operator profile of ours's reassociated graph (``--profile`` with ``--backend
    onnxruntime``): ms a call by operator type, over ``runs`` calls after a warm-up, on a session of its own opened
    as ours's are, fed as ours feeds it."""
    import collections
    import tempfile

    from engines.ort import Session

    graph = ours.s["blip_itm_rx"]
    prefix = str(Path(tempfile.gettempdir()) / "imgsearch-rx-profile")
    run = Session(graph.path, graph.device, graph.threads, graph.shared, check=False, profile=prefix)
    ids, mask = ours.query_inputs(query)
    feeds = {"input_ids": ids, "attention_mask": mask, "owner": np.zeros(len(stored), np.int64),
             "image_embeds": np.stack(stored)}
    run(**feeds)  # warm-up (profiled too: dropped below)
    for _ in range(runs):
        run(**feeds)
    trace = run.end_profiling()
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_call = len(kernels) // (runs + 1)
    by_op: collections.Counter[str] = collections.Counter()
    for e in kernels[per_call:]:  # the warm-up's kernels are the first call's
        by_op[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return {op: round(ms, 1) for op, ms in by_op.most_common()}


def compare(folder: Path, precision: str, pairs: int, device: str = "cpu", engine_dir: Path | None = None,
            backend: str = "torch", build: Path = Path("build"), profile: bool = False) -> dict[str, Any]:
    """Ours (eager, or ``backend`` onnxruntime) and main's pass, alternating; where ours packs its weights (bf16 on
    a CPU, engines/packed.py), also ours on its plain weights; with ``engine_dir``, also ours with the rerank
    compiled for this host (engines/compiled.py; built there first where missing); all in a rotating order."""
    from bench.baseline import main_rerank
    from bench.engines import exact_query

    ours = _ours(folder, precision, device, backend, build)
    # main had no int8 torch pass: against int8, main's pass in fp32 (the precision it ran on such a CPU); against
    # ONNX Runtime, main's torch pass in its precision
    main = main_rerank(TorchBlip(str(folder), precision="fp32" if precision == "int8" else precision, device=device,
                                 compiled="off"))
    rng = np.random.default_rng(0)
    shape = (ours.shape["patches"], ours.shape["width"])
    stored = [rng.standard_normal(shape).astype(np.float16) for _ in range(CANDIDATES)]
    kept = [ours.stored_form(f) for f in stored]
    query = exact_query(ours, TOKENS)
    runs = {"ours": (ours, kept), "main": (main, stored)}
    if backend == "torch" and ours.cores.rx.packed:  # ours on its plain weights: what packing them gives (engines/packed.py)
        plain = TorchBlip(str(folder), precision=precision, device=device, compiled="off", packed=False)
        runs["unpacked"] = (plain, kept)
    if engine_dir is not None and backend == "torch" and precision in compiled.PRECISIONS:  # torch int8 runs eager
        t0 = time.perf_counter()
        package = compiled.build(ours, engine_dir)
        built_s = time.perf_counter() - t0
        fast = TorchBlip(str(folder), precision=precision, device=device, compiled="on", engine_dir=engine_dir)
        runs["compiled"] = (fast, kept)
    got = {k: b.score(query, f) for k, (b, f) in runs.items()}  # warm-up, and the numbers compared
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(pairs):
        for k in names[i % len(names):] + names[:i % len(names)]:
            b, f = runs[k]
            t0, c0 = time.perf_counter(), time.process_time()
            b.score(query, f)  # its answer comes back as NumPy: a GPU's work has finished
            wall[k].append((time.perf_counter() - t0) * 1000)
            cpu[k].append((time.process_time() - c0) * 1000)
    med = {k: statistics.median(v) for k, v in wall.items()}
    rep = {"device": device, "backend": backend, "precision": precision, "threads": torch.get_num_threads(),
           "candidates": CANDIDATES, "tokens": TOKENS,
           "pairs": pairs, "ours_ms": round(med["ours"], 1), "main_ms": round(med["main"], 1),
           "ours_min_ms": round(min(wall["ours"]), 1), "main_min_ms": round(min(wall["main"]), 1),
           "ours_cpu_ms": round(statistics.median(cpu["ours"]), 1),
           "main_cpu_ms": round(statistics.median(cpu["main"]), 1),
           "pair_ratio_median": round(statistics.median([m / o for m, o in zip(wall["main"], wall["ours"], strict=True)]), 3),
           "itm_max_diff": float(np.abs(got["ours"][0] - got["main"][0]).max()),
           "cos_max_diff": float(np.abs(got["ours"][1] - got["main"][1]).max()),
           "speedup": round(med["main"] / med["ours"], 3)}
    if "unpacked" in runs:
        rep.update({"unpacked_ms": round(med["unpacked"], 1), "packed_pair_ratio_median": round(statistics.median(
            [u / o for u, o in zip(wall["unpacked"], wall["ours"], strict=True)]), 3)})
    if profile:
        rep["ort_profile_ms"] = ort_profile(ours, query, kept, max(2, pairs // 2))
    if "compiled" in runs:
        rep.update({"compiled_ms": round(med["compiled"], 1), "compiled_min_ms": round(min(wall["compiled"]), 1),
                    "compiled_cpu_ms": round(statistics.median(cpu["compiled"]), 1),
                    "compiled_pair_ratio_median": round(statistics.median(
                        [m / o for m, o in zip(wall["main"], wall["compiled"], strict=True)]), 3),
                    "compiled_itm_max_diff": float(np.abs(got["compiled"][0] - got["ours"][0]).max()),
                    "compiled_speedup": round(med["main"] / med["compiled"], 3),
                    "compiled_package": package.name, "compiled_build_s": round(built_s, 1)})
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--models", choices=("tiny", "base"), default=None, help="default: base (tiny with --quick)")
    ap.add_argument("--precision", default=None,
                    help="torch's precision (default: bf16 where this CPU has it natively, else fp32; fp16 on cuda)")
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs (default 15, 4 with --quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (with --precision fp16 on a GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                    help="ours on torch (eager) or on ONNX Runtime (its graphs built under BUILD/engines first); main's "
                         "pass runs on torch either way")
    ap.add_argument("--profile", action="store_true",
                    help="with --backend onnxruntime: also ONNX Runtime's per-operator profile of ours's rerank graph")
    ap.add_argument("--compiled", action="store_true",
                    help="also time ours with the rerank compiled for this host (built under BUILD/engines first: "
                         "about a minute); the last line is then its speedup (fp32 and bf16: torch int8 runs eager)")
    args = ap.parse_args()
    if args.profile and args.backend != "onnxruntime":
        ap.error("--profile here is ONNX Runtime's (with --backend onnxruntime); torch's: python -m bench.engines --profile")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder, label = _models(args.build, args.models or ("tiny" if args.quick else "base"))
    if args.backend == "onnxruntime":
        precision = args.precision or "int8"
    else:
        precision = args.precision or ("fp16" if args.device.startswith("cuda") else torch_cpu_precision())
    rep = {"models": label, **compare(folder, precision, args.pairs or (4 if args.quick else 15), args.device,
                                      args.build / "engines" if args.compiled else None, args.backend, args.build,
                                      args.profile)}
    print(f"{label}, {rep['backend']} {rep['precision']} on {rep['device']}, {rep['threads']} threads, "
          f"{CANDIDATES} candidates x {TOKENS} tokens, "
          f"{rep['pairs']} alternating pairs: ours {rep['ours_ms']} ms (min {rep['ours_min_ms']}, CPU "
          f"{rep['ours_cpu_ms']}), main's {rep['main_ms']} ms (min {rep['main_min_ms']}, CPU {rep['main_cpu_ms']}); "
          f"median of pair ratios {rep['pair_ratio_median']}x; largest difference ITM {rep['itm_max_diff']:.2e}, "
          f"cosine {rep['cos_max_diff']:.2e}")
    if "unpacked_ms" in rep:
        print(f"ours on unpacked weights: {rep['unpacked_ms']} ms; median of pair ratios against ours (packed) "
              f"{rep['packed_pair_ratio_median']}x")
    if "compiled_ms" in rep:
        print(f"compiled for this host ({rep['compiled_package']}, built or found in {rep['compiled_build_s']} s): "
              f"{rep['compiled_ms']} ms (min {rep['compiled_min_ms']}, CPU {rep['compiled_cpu_ms']}); median of pair "
              f"ratios against main's {rep['compiled_pair_ratio_median']}x; largest ITM difference from ours eager "
              f"{rep['compiled_itm_max_diff']:.2e}")
    if "ort_profile_ms" in rep:
        prof = rep["ort_profile_ms"]
        total = sum(prof.values()) or 1.0
        print(f"ONNX Runtime's profile of ours ({total:.1f} ms of kernels a call): " + ", ".join(
            f"{op} {ms} ms ({100 * ms / total:.0f}%)" for op, ms in list(prof.items())[:10]))
    print(json.dumps(rep))
    print(f"rerank_speedup={rep.get('compiled_speedup', rep['speedup']):.2f}")


if __name__ == "__main__":
    main()

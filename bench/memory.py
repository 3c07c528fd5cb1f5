"""What a worker needs on a CPU with the real checkpoints' sizes: process RSS and load time per model and for a
whole worker (SigLIP + BLIP), and the ONNX export sizes, on the full-size random-weight models (engines/fullsize.py:
the real configs, a 256,000-entry SigLIP 2 vocabulary). Each load runs in a fresh process, so RSS is that
model's alone, and starts cold (the model's files are dropped from the page cache first: safetensors are
memory-mapped, so a warm cache hides the disk read). CPU heavy (minutes): run it once, not beside other benchmarks.

    python -m bench.memory [--out bench/results/memory.json] [--build build/memory] [--no-onnx]
    python -m bench.memory --quick   # the tiny models, no ONNX: seconds (the method, not the figures)
The last line is the report as one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COMBOS = {"siglip": ("siglip",), "blip-large": ("blip",), "blip-base": ("blip-base",),
          "worker (siglip + blip-large)": ("siglip", "blip"), "worker (siglip + blip-base)": ("siglip", "blip-base")}


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or one part of it: RssAnon (heap, the process's own) or RssFile
    (file pages: safetensors weights are memory-mapped, and a page nobody reads is never loaded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(models: Path, names: list[str]) -> dict[str, Any]:
    """In a fresh process: import what a worker imports, then load each model with torch fp32 and warm it up as a
    search worker does (SigLIP's text tower, BLIP's text side); then read every weight once (an ingest worker
    also runs both image towers)."""
    import numpy as np
    import torch  # noqa: F401 - counted in the base, as in a worker

    from engines.blip import TorchBlip
    from engines.siglip import TorchSiglip

    for name in names:  # a cold start: this model's files leave the page cache (theirs only, not the machine's)
        for f in (models / name).iterdir():
            with f.open("rb") as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    base = _rss_mb()
    loads: dict[str, float] = {}
    held: list[Any] = []  # held: the models stay loaded, as in a worker, until RSS is read
    for name in names:
        t0 = time.perf_counter()
        if name == "siglip":
            held.append(TorchSiglip(str(models / name)))
        else:  # as a search worker warms up: the text side on stored features (its vision tower runs at ingest)
            m = TorchBlip(str(models / name))
            v = m.model.config.vision_config
            tokens = (v.image_size // v.patch_size) ** 2 + 1
            m.score("a warm up query", [np.zeros((tokens, v.hidden_size), np.float16)])
            held.append(m)
        loads[name] = round(time.perf_counter() - t0, 2)
    out = {"base_rss_mb": round(base), "load_s": loads, "rss_mb": round(_rss_mb()),
           "rss_anon_mb": round(_rss_mb("RssAnon")), "rss_file_mb": round(_rss_mb("RssFile"))}
    # every weight read once: what a worker that runs every tower holds (an ingest worker runs the image towers)
    t0 = time.perf_counter()
    for m in held:
        for p in m.model.parameters():
            float(p.detach().float().sum())
    out["read_rest_s"] = round(time.perf_counter() - t0, 2)
    out["rss_all_weights_mb"] = round(_rss_mb())
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def onnx_sizes(models: Path, engines: Path) -> dict[str, Any]:
    from engines.artifacts import BLIP_COMPONENTS, SIGLIP_COMPONENTS
    from engines.export import build_onnx

    out: dict[str, Any] = {}
    for model, blip, components in (("siglip", "blip", SIGLIP_COMPONENTS), ("blip-large", "blip", BLIP_COMPONENTS),
                                    ("blip-base", "blip-base", BLIP_COMPONENTS)):
        for component in components:
            t0 = time.perf_counter()
            built = build_onnx(str(models / "siglip"), str(models / blip), engines / model, precisions=("fp32", "int8"),
                               components=(component,))
            out[f"{model}/{component}"] = {"build_s": round(time.perf_counter() - t0, 1),
                                           **{p.name.split(".")[1]: round(p.stat().st_size / 1e6, 1) for p in built}}
            print(component, out[f"{model}/{component}"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, default=Path("build/memory"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory.json"))
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--child", default="")
    ap.add_argument("--quick", action="store_true", help="the tiny models, no ONNX, nothing written")
    args = ap.parse_args()
    models = args.build / ("tiny" if args.quick else "fullsize")
    if args.child:
        print(json.dumps(child(models, args.child.split(","))))
        return

    from engines.check import count_params
    from engines.fullsize import make_fullsize_models

    t0 = time.perf_counter()
    combos = COMBOS
    if args.quick:
        from engines.tiny import make_tiny_models

        made = dict(zip(("siglip", "blip"), make_tiny_models(models), strict=True))
        combos = {"worker (siglip + blip)": ("siglip", "blip")}
        args.no_onnx, args.out = True, None
    else:
        made = make_fullsize_models(models, which=("siglip", "blip", "blip-base"))
    report: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "made_s": round(time.perf_counter() - t0, 1),
                              "params": {n: count_params("siglip" if n == "siglip" else "blip", p) for n, p in made.items()},
                              "weights_mb": {n: round(sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e6)
                                             for n, p in made.items()},
                              "processes": {}}
    for label, names in combos.items():
        res = subprocess.run([sys.executable, "-m", "bench.memory", "--build", str(args.build), "--child", ",".join(names)]
                             + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        report["processes"][label] = json.loads(res.stdout.strip().splitlines()[-1])
        print(label, report["processes"][label], flush=True)
    if not args.no_onnx:
        report["onnx_mb"] = onnx_sizes(models, args.build / "engines")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

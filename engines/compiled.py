"""The reassociated rerank pass (``ReassociatedItm.with_text``) compiled ahead of time for this host, with
AOTInductor: ``torch.export`` traces the pass once with its batch dimensions symbolic (queries, tokens,
candidates), Inductor writes and compiles C++ for it (fused elementwise kernels; the products in its own GEMM
micro-kernels or oneDNN's), and a worker loads the package in a fraction of a second.

Built by a command, as ONNX Runtime's and TensorRT's engines are (``imgsearch engines build --backend torch
--precision bf16``: one to two minutes on 2 cores, with a C++ compiler), never at request time. Every build is
checked against the eager pass before it is kept (``self_check``). Its file name carries the model
version (the folder), the graph's revision, the precision and a tag of this host (the torch version, the CPU model
and its feature flags: the C++ is compiled for the instruction set at hand, and a package from another CPU could
fault or be slow), so a worker only ever loads one made for its own machine and finds none otherwise. With
``engines.compiled=auto`` (the default) a torch worker on a CPU uses the package where it is built and the eager
pass where not; ``on`` requires it, ``off`` never loads it.

Why: on a 2-core Intel Xeon with AMX in bf16, the eager pass spends a large part of a 32-candidate rerank outside
the large products (dispatch of ~3,000 small operators, LayerNorms, GELU, softmax, copies) and runs the products
below the machine's rate; ``python -m bench.rerank --compiled`` gives the figures (see the README).
``torch.compile`` at worker start measured a similar gain but took 45 to 72 s at every start (56 s with a warm
cache), where a package loads in 0.2 s.

A call outside the shapes it was built for (``fits``) runs the eager pass, which gives the same numbers up to
rounding; the explain path (``engines/explain.py``) always runs eager, since it reads the attention probabilities.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines import packed as packing
from engines.artifacts import EngineMissing, graph_name
from engines.crossattn import ReassociatedItm

log = logging.getLogger(__name__)

GRAPH = "blip_itm_rx"
PRECISIONS = ("fp32", "bf16")  # on a CPU; fp16 has no fast CPU kernels
# the symbolic dimensions' ranges: queries per call, tokens (up to the engine's limit), candidates per call
MAX_QUERIES, MAX_CANDIDATES = 256, 1024
MODES = ("auto", "on", "off")
# Inductor's defaults (fused elementwise kernels, oneDNN for the products), with no weights in the package: the
# engine's own are bound at load (``user_managed``), so it adds no memory and is a few megabytes. Inductor's
# max-autotune C++ GEMM templates were measured too (2-core AMX Xeon, BLIP-base bf16): 104 against 116 ms at 32
# candidates x 8 tokens, but with symbolic batch dimensions they failed an assertion unless their epilogue fusion
# was off, and then gave NaN at other shapes (one query over one candidate) and once aborted the process: not used.
# Inductor's freezing (the weights packed for oneDNN at build, GELU fused into its product) was measured on the same
# machine: 119 against 156 ms a pass, but it writes the weights into the package as oneDNN's packed tensors, which a
# worker cannot bind to its own (a 279 MB package, 614 MB more resident memory a worker, 2.5 s to load): not used.
# Its weight packing is done instead at load, on the worker's own weights (engines/packed.py: the package calls the
# C++ operator imgsearch_native::packed_linear, which finds them), GELU in the feed-forward product's epilogue.
INDUCTOR = {"aot_inductor.package_constants_in_so": False}
# what a build writes, besides the graph's own revision: a package from an earlier one computes the same numbers and
# still loads, and the next build replaces it (2: the image-attention probabilities held contiguous, crossattn._contiguous;
# 3: the linear products on weights packed for oneDNN, engines/packed.py, through a Python operator; 4: through
# its C++ twin, which needs no GIL)
REVISION = 4
# the largest difference from the eager pass's outputs at the same precision a package may show in its check
TOLERANCE = {"fp32": 1e-4, "bf16": 0.02}


def compiler() -> str:
    """The C++ compiler Inductor calls: ``$CXX``, else g++."""
    return os.environ.get("CXX", "g++")


def has_compiler() -> bool:
    return shutil.which(compiler()) is not None


def host_tag() -> str:
    """12 hex digits naming what the compiled C++ depends on: torch's version, the CPU model and its flags."""
    from engines.auto import cpu

    model, flags = cpu()
    stamp = json.dumps({"torch": torch.__version__, "cpu": model, "flags": sorted(flags)})
    return hashlib.sha256(stamp.encode()).hexdigest()[:12]


def package_path(engine_dir: Path, model_version: str, precision: str) -> Path:
    """``{engine_dir}/{model version}/blip_itm_rx.r3.{precision}.aoti-{host tag}.pt2`` (the graph at its revision,
    ``graph_name``); beside it a ``.json`` with its check's result."""
    return engine_dir / model_version / f"{graph_name(GRAPH)}.{precision}.aoti-{host_tag()}.pt2"


def is_current(path: Path) -> bool:
    """Whether a package file was built for this host (by its name's tag)."""
    return path.name.endswith(f".aoti-{host_tag()}.pt2")


class _Pass(nn.Module):
    """What is exported: the reassociated pass with the ITC text rows, as ``TorchBlip._itm_text`` calls it. The
    package's constants are named by this module's parameter and buffer names."""

    def __init__(self, rx: ReassociatedItm) -> None:
        super().__init__()
        self.rx = rx

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owner: torch.Tensor,
                image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rx.with_text(input_ids, attention_mask, owner, image_embeds)


def build(blip: Any, engine_dir: Path, force: bool = False) -> Path:
    """Export and compile ``blip``'s (a ``TorchBlip`` on the CPU) reassociated pass at its precision into its
    package for this host; one already there is kept unless ``force``."""
    from torch.export import Dim

    precision = _precision_of(blip)
    path = package_path(engine_dir, blip.version, precision)
    limits = {"queries": MAX_QUERIES, "tokens": max(3, blip.max_tokens), "candidates": MAX_CANDIDATES}
    record = _record(path)
    if path.is_file() and record.get("limits") == limits and record.get("revision") == REVISION and not force:
        return path  # built for these shapes by this code: kept (another token limit, or an older build: built again)
    if blip.device.type != "cpu":
        raise ValueError("the compiled rerank is built for CPUs (a GPU has TensorRT: --backend tensorrt)")
    if not has_compiler():
        raise RuntimeError(f"the compiled rerank needs a C++ compiler ({compiler()}, or set CXX): `apt-get install g++`")
    patches, width = blip.shape["patches"], blip.shape["width"]
    # example sizes above 1 on every symbolic dimension (export specialises a dimension seen at 1)
    ids, mask = (torch.from_numpy(a).repeat(2, 1) for a in blip.query_inputs("a photo of a cat"))
    example = (ids, mask, torch.tensor([0, 1, 1], dtype=torch.long), torch.zeros(3, patches, width, dtype=blip.dtype))
    queries = Dim("queries", min=1, max=limits["queries"])
    tokens = Dim("tokens", min=2, max=limits["tokens"])
    candidates = Dim("candidates", min=1, max=limits["candidates"])
    module = _Pass(blip.cores.rx).eval()
    log.info("compiling the rerank pass (%s, %s) for this host: about a minute", blip.version, precision)
    # packed weights: the package calls the C++ operator on them (engines/packed.py), built and loaded first
    native = packing.build_native(engine_dir) if blip.cores.rx.packed else None
    if native is not None:
        packing.load_native(native)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own, internal
            with torch.inference_mode():
                program = torch.export.export(module, example, strict=False, dynamic_shapes=(
                    {0: queries, 1: tokens}, {0: queries, 1: tokens}, {0: candidates}, {0: candidates}))
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=dict(INDUCTOR))
        built_s = time.perf_counter() - t0
        worst = self_check(CompiledPass(tmp, limits, blip.cores.rx, native), blip)
        if not worst <= TOLERANCE[precision]:
            raise RuntimeError(f"the compiled rerank for {blip.version} {precision} gave outputs {worst:.3g} away from the "
                               f"eager pass here (bound {TOLERANCE[precision]}): not kept; the eager pass serves")
        path.with_suffix(".json").write_text(json.dumps({"revision": REVISION, "build_s": round(built_s, 1), "max_diff": worst,
                                                         "limits": limits, "inductor": INDUCTOR,
                                                         "native": native.name if native else None}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("compiled rerank %s in %.0f s: outputs within %.2g of the eager pass", path.name, built_s, worst)
    return path


def _record(path: Path) -> dict[str, Any]:
    """What the build wrote beside a package (its check, the shapes it was built for); empty if unreadable."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def self_check(compiled: CompiledPass, blip: Any) -> float:
    """The largest difference between ``compiled``'s outputs and ``blip``'s eager pass's (ITM, the image projection
    and the text embedding the cosine is made of), over calls of several shapes
    (one query and 32 candidates; two queries of different lengths over 5; one candidate) on random stored
    features (seeded); NaN or infinity counts as infinitely far."""
    rng = np.random.default_rng(0)
    shape = (blip.shape["patches"], blip.shape["width"])
    worst = 0.0
    for queries, owner in ((["a surprised cat face"], [0] * 32),
                           (["a dog", "two red circles on a white field"], [0, 1, 1, 0, 1]), (["a photo"], [0])):
        tok = blip.tokenizer(queries, truncation=True, max_length=blip.max_tokens, padding="longest", return_tensors="np")
        feats = (rng.standard_normal((len(owner), *shape)) * 0.5).astype(np.float32)
        args = (torch.from_numpy(tok["input_ids"].astype(np.int64)), torch.from_numpy(tok["attention_mask"].astype(np.int64)),
                torch.tensor(owner, dtype=torch.long), torch.from_numpy(feats).to(blip.dtype))
        with torch.inference_mode():
            want = blip.cores.rx.with_text(*args)
            try:
                got = compiled(*args)
            except Exception as exc:  # noqa: BLE001 - a package that fails at a shape it was built for is not kept
                log.warning("compiled rerank: the check's call over %d candidates failed: %s", len(owner), exc)
                return float("inf")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):  # ITM; the image projection and text embedding,
            g, w = g.float(), w.float()                                 # as the cosine sees them (unit length)
            if i:
                g, w = nn.functional.normalize(g, dim=-1), nn.functional.normalize(w, dim=-1)
            diff = float((g - w).abs().max()) if g.shape == w.shape else float("inf")
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst


def _precision_of(blip: Any) -> str:
    precision = getattr(blip, "precision", None)
    if precision not in PRECISIONS:
        raise ValueError(f"the compiled rerank runs {' or '.join(PRECISIONS)}, not {precision}")
    return str(precision)


class CompiledPass:
    """A loaded package. ``fits`` says whether a call's shapes are among those it
    was built for."""

    def __init__(self, path: Path, limits: dict[str, int], rx: ReassociatedItm, native: Path | None = None) -> None:
        """``limits``: the largest queries, tokens and candidates it was built for; ``rx``: the engine's pass, whose
        weights the package is bound to; ``native``: the library of the C++ operator it calls on packed weights,
        loaded first (``engines/packed.py``)."""
        self.path = path
        self.limits = limits
        if native is not None:
            packing.load_native(native)
        self.runner = torch._inductor.aoti_load_package(str(path))
        names = self.runner.get_constant_fqns()
        module = _Pass(rx)
        own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        missing = [n for n in names if n not in own]
        if missing:
            raise EngineMissing(f"{path.name} does not match the loaded model (it names {missing[0]!r}); rebuild it "
                                "with `imgsearch engines build --backend torch --force`")
        self.runner.load_constants({n: own[n] for n in names}, check_full_update=True, user_managed=True)

    def fits(self, queries: int, tokens: int, candidates: int) -> bool:
        return (1 <= queries <= self.limits["queries"] and 2 <= tokens <= self.limits["tokens"]
                and 1 <= candidates <= self.limits["candidates"])

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.runner(*args)  # type: ignore[no-any-return]


def load(blip: Any, engine_dir: Path | None, mode: str) -> CompiledPass | None:
    """The package for ``blip`` on this host where ``mode`` allows it: ``auto`` loads it where built, ``on``
    requires it (else ``EngineMissing`` naming the build command), ``off`` (or a GPU, or a precision without
    one) never."""
    if mode not in MODES:
        raise ValueError(f"unknown engines.compiled {mode!r}; valid: {', '.join(MODES)}")
    if mode == "off":
        return None
    precision = getattr(blip, "precision", None)
    if blip.device.type != "cpu" or precision not in PRECISIONS or engine_dir is None:
        if mode == "on":
            raise ValueError(f"engines.compiled=on: the compiled rerank runs on a CPU in fp32 or bf16 with an engine "
                             f"dir (here {blip.device.type}, {precision})")
        return None
    path = package_path(engine_dir, blip.version, precision)
    if not path.is_file():
        if mode == "on":
            raise EngineMissing(f"the compiled rerank {path.name} for {blip.version} is missing (looked in {path.parent}); "
                                f"build it with `imgsearch engines build --backend torch --precision {precision}`")
        return None
    try:
        record = _record(path)
        limits, native = record["limits"], record.get("native")
        library = engine_dir / "native" / native if native else None
        if library is not None and not library.is_file():
            raise EngineMissing(f"its operator library native/{native} is missing")
        return CompiledPass(path, {k: int(limits[k]) for k in ("queries", "tokens", "candidates")}, blip.cores.rx,
                            library)
    except Exception as exc:  # noqa: BLE001 - auto serves eager from a package it cannot use; on refuses to start
        message = (f"the compiled rerank {path.name} cannot be used ({type(exc).__name__}: {exc}); rebuild it with "
                   f"`imgsearch engines build --backend torch --precision {precision} --force`")
        if mode == "on":
            raise EngineMissing(message) from exc
        log.warning("%s; the eager pass serves", message)
        return None

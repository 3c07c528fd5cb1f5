"""``auto``: the engine backend and precision a worker runs when none is set (the default).

At worker start the CPU's features (or the GPU) name the candidates:

- CUDA: TensorRT fp16 where its plans are built, else torch fp16;
- a CPU with native bf16 (``avx512_bf16`` or AMX's ``amx_bf16``): torch bf16, confirmed against torch fp32;
- any other CPU (VNNI, or AVX2 alone): ONNX Runtime int8 and fp32 (where their engines are built) and, with
  ``avx512_vnni``, torch int8 (``engines/intmm.py``, nothing to build: without it torch runs its int8 products in a
  reference loop, ``intmm.fast``) measured against torch fp32. int8 is right on every x86 kind (7-bit
  weights where a kernel adds pairs in 16 bits, and a self-check against fp32 at load, for both backends: README
  "int8 on every CPU" and "torch int8"), and where
  VNNI is missing it still pays: on a 2-core AVX2-only EPYC (Zen 3) ONNX Runtime's uint8 x int8 products ran at
  2.2x, and its uint8 x uint8 ones (the rerank's) at 1.6x, its fp32 products' rate (``python -m bench.int8 --quick``).

The flags are the CPU's as oneDNN may use them: with ``ONEDNN_MAX_CPU_ISA`` capped below bf16 (or AMX), torch's
bf16 products are not native, so those flags do not count (a cap also lets one CPU stand in for a lesser one in
a benchmark).

A short timed pass on the real models (the text tower on one query, the rerank of ``CANDIDATES`` stored
features; a warm-up, then at least two rounds, more within ``BUDGET_S``) picks the fastest candidate; a lone
candidate is not timed. The choice is cached per host and model versions in ``{engine_dir}/auto/`` (with the CPU
model, torch version, thread count and candidates it was made with: another, or engines built since, measures
again), logged with its reason, and shown on ``/readyz`` and by ``imgsearch models check``. An explicit backend or
precision always wins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings import WorkerSettings

log = logging.getLogger(__name__)

AUTO = "auto"
# the rerank's candidates in the timed pass: 8, not search's 32 (its cost is linear in them, so the ranking of the
# candidates is the same; with BLIP-base on 2 busy cores a round of 32 took 3.5 s in bf16 and 8 s in fp32)
CANDIDATES = 8
BUDGET_S = 3.0  # the timed pass's rounds stop after this long per candidate (at least two rounds each)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
TORCH_INT8_FLAG = "avx512_vnni"  # torch 2.13 sends _int_mm to oneDNN only with it (engines/intmm.py ``fast``)
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) and the flags each leaves out of what oneDNN runs natively
_CAPPED = {"SSE41": BF16_FLAGS + VNNI_FLAGS, "AVX": BF16_FLAGS + VNNI_FLAGS, "AVX2": BF16_FLAGS + VNNI_FLAGS,
           "AVX2_VNNI": BF16_FLAGS + ("avx512_vnni", "amx_int8"), "AVX2_VNNI_2": BF16_FLAGS + ("avx512_vnni", "amx_int8"),
           "AVX512_CORE": BF16_FLAGS + VNNI_FLAGS, "AVX512_CORE_VNNI": BF16_FLAGS + ("amx_int8",),
           "AVX512_CORE_BF16": ("amx_bf16", "amx_int8"), "AVX10_1_512": ("amx_bf16", "amx_int8")}


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    reason: str
    measured_ms: dict[str, float] = field(default_factory=dict)  # "backend precision" -> one query's ms

    def describe(self) -> dict[str, Any]:
        return {"auto": self.reason, **({"auto_measured_ms": self.measured_ms} if self.measured_ms else {})}


def cpu() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags (Linux's /proc/cpuinfo; elsewhere unknown, no flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", set()
    model, flags = "unknown", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    cap = onednn_cap()
    return model, flags - set(_CAPPED.get(cap, ()))


def onednn_cap() -> str:
    """oneDNN's ISA cap from the environment (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()


def _onnx_built(s: WorkerSettings, precision: str) -> bool:
    from engines.artifacts import missing_graphs
    from engines.blip import SETTING as BLIP_SETTING
    from engines.loading import resolve, version_of
    from engines.siglip import SETTING as SIGLIP_SETTING

    try:
        siglip = version_of(resolve(s.engines.siglip_model, SIGLIP_SETTING))
        blip = version_of(resolve(s.engines.blip_model, BLIP_SETTING))
    except Exception:  # noqa: BLE001 - a model that does not resolve fails later, with its own message
        return False
    return not missing_graphs(s.engines_path, siglip, "siglip", precision) and \
        not missing_graphs(s.engines_path, blip, "blip", precision)


def _trt_built(s: WorkerSettings) -> bool:
    try:
        from engines.registry import preflight

        preflight(s.model_copy(update={"engines": {"backend": "tensorrt", "precision": "fp16"}}))
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - not built or not installed: torch fp16
        return False
    return True


def candidates(s: WorkerSettings, flags: set[str] | None = None) -> tuple[list[tuple[str, str]], str]:
    """The (backend, precision) pairs worth timing on this machine, and why those."""
    if s.engines.device.startswith("cuda"):
        if _trt_built(s):
            return [("tensorrt", "fp16")], "CUDA with TensorRT plans built"
        return [("torch", "fp16")], "CUDA without TensorRT plans: torch fp16"
    flags = cpu()[1] if flags is None else flags
    have = sorted(flags & set(BF16_FLAGS))
    if have:
        return [("torch", "bf16"), ("torch", "fp32")], f"native bf16 ({', '.join(have)})"
    # without bf16, ONNX Runtime's engines where they are built (int8 and fp32) and torch int8, timed against torch
    # fp32 (on a 2-core AVX2-only EPYC ONNX Runtime's reassociated rerank took 812 ms in int8 and 886 in fp32
    # against torch fp32's 1,132: `python -m bench.engines --quick --rerank-only --models base`)
    vnni = sorted(flags & set(VNNI_FLAGS))
    why = f"VNNI without bf16 ({', '.join(vnni)})" if vnni else "no native bf16 or VNNI on this CPU"
    built = [p for p in onnx_precisions_needed(flags) if _onnx_built(s, p)]
    pairs = [("onnxruntime", p) for p in built] + [("torch", "int8"), ("torch", "fp32")]
    if TORCH_INT8_FLAG not in flags:
        pairs.remove(("torch", "int8"))
        why += f"; no torch int8 (without {TORCH_INT8_FLAG} torch runs its int8 products in a reference loop)"
    if "int8" not in built:
        why += (f"; no ONNX Runtime {'int8 ' if built else ''}engines built to time against torch fp32 "
                "(`imgsearch engines build --backend onnxruntime --precision int8`)")
    return pairs, why


def onnx_precisions_needed(flags: set[str] | None = None) -> tuple[str, ...]:
    """The ONNX Runtime engines ``auto`` would time on this CPU (where built), fastest first, for a benchmark to
    build first: none with native bf16, int8 and fp32 without it."""
    flags = cpu()[1] if flags is None else flags
    return () if flags & set(BF16_FLAGS) else ("int8", "fp32")


def torch_cpu_precision(flags: set[str] | None = None) -> str:
    """torch's precision on this CPU without a timed pass (the benchmarks' default, and an explicit torch backend's
    with precision auto): bf16 where it is native, else fp32 (without native bf16 torch's bf16 products crawl: a
    2048-cube matmul at 0.28 GFLOP/s on an AVX2-only EPYC, against 175 in fp32). int8 is timed by ``auto``, or set:
    its gain over fp32 depends on the kernels (with avx512_vnni only: README "torch int8")."""
    flags = cpu()[1] if flags is None else flags
    return "bf16" if flags & set(BF16_FLAGS) else "fp32"


def precision_for(backend: str, s: WorkerSettings, flags: set[str] | None = None) -> str:
    """``auto`` precision on an explicit backend: the fastest this machine runs it at without a timed pass."""
    if backend == "tensorrt":
        return "fp16"
    if s.engines.device.startswith("cuda"):
        return "fp16" if backend == "torch" else "fp32"
    if backend == "onnxruntime":
        return "int8" if _onnx_built(s, "int8") else "fp32"
    return torch_cpu_precision(flags)


# --- the cache: one file per host and model versions ---
def cache_path(s: WorkerSettings) -> Path:
    from engines.blip import SETTING as BLIP_SETTING
    from engines.loading import resolve, version_of
    from engines.siglip import SETTING as SIGLIP_SETTING

    siglip = version_of(resolve(s.engines.siglip_model, SIGLIP_SETTING))
    blip = version_of(resolve(s.engines.blip_model, BLIP_SETTING))
    host = (s.host or "host").replace("/", "_")
    return s.engines_path / "auto" / f"{host}.{s.engines.device}.{siglip}.{blip}.json"


def _stamp() -> dict[str, str]:
    import torch

    return {"cpu": cpu()[0], "torch": torch.__version__, **({"onednn_cap": onednn_cap()} if onednn_cap() else {})}


def cached(s: WorkerSettings) -> Choice | None:
    try:
        saved = json.loads(cache_path(s).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("stamp") != _stamp() or saved.get("threads") != s.engines.intra_op_threads:
        return None
    # engines built since (or removed): the candidates differ, so the choice is made again
    if saved.get("candidates") != _candidate_key(s) or saved.get("compiled", []) != _compiled_key(s):
        return None
    return Choice(**saved["choice"])


def _candidate_key(s: WorkerSettings) -> list[list[str]]:
    """The candidates as the cache file keeps them (JSON lists)."""
    return [list(p) for p in candidates(s)[0]]


def _compiled_key(s: WorkerSettings) -> list[str]:
    """The precisions whose compiled rerank (engines/compiled.py) the torch backend would load here: one built
    since the choice changes what torch's candidates measure."""
    from engines.blip import SETTING as BLIP_SETTING
    from engines.compiled import PRECISIONS, package_path
    from engines.loading import resolve, version_of

    if s.engines.compiled == "off" or not s.engines.device.startswith("cpu"):
        return []
    try:
        blip = version_of(resolve(s.engines.blip_model, BLIP_SETTING))
    except Exception:  # noqa: BLE001 - a model that does not resolve fails later, with its own message
        return []
    return [p for p in PRECISIONS if package_path(s.engines_path, blip, p).is_file()]


def _save(s: WorkerSettings, choice: Choice, compiled: list[str]) -> None:
    path = cache_path(s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"choice": asdict(choice), "stamp": _stamp(), "threads": s.engines.intra_op_threads,
                                   "candidates": _candidate_key(s), "compiled": compiled}))
        tmp.replace(path)
    except OSError as exc:  # a read-only engine dir: measured again next start
        log.warning("auto: could not cache the choice in %s: %s", path, exc)


# --- the timed pass ---
def time_query(engines: Any, budget_s: float = BUDGET_S) -> float:
    """One query's engine time on ``engines``: the text tower on a query, then the rerank of ``CANDIDATES``
    stored features; the fastest of at least three rounds after a warm-up, within about ``budget_s``. The
    fastest, not the median: other work on the machine only ever adds time, so the minimum is the estimate it
    disturbs least (a median taken while another process ran once timed bf16 slower than fp32 on an AMX CPU
    where it is twice as fast, and the choice is cached per host)."""
    import numpy as np
    from PIL import Image

    probe = engines.reranker.vision_features([Image.new("RGB", (64, 64), (120, 80, 40))])[0]
    rng = np.random.default_rng(0)
    feats = [(probe + rng.standard_normal(probe.shape).astype(np.float16) * np.float16(0.1)).astype(np.float16)
             for _ in range(CANDIDATES)]
    query = "a surprised cat face on a white background"

    def once() -> float:
        t0 = time.perf_counter()
        engines.text.encode_text([query])
        engines.reranker.score(query, feats)
        return (time.perf_counter() - t0) * 1000

    once()  # warm-up: first-run allocations
    times, start = [once()], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 7):
        times.append(once())
    return min(times)


def choose(s: WorkerSettings, load: Callable[[WorkerSettings], Any]) -> tuple[Choice, Any]:
    """The choice for ``s`` (a setting of ``auto``), and the chosen engines if the timed pass loaded them (else
    None: the caller loads them). ``load`` loads a concrete configuration's engines."""
    if s.engines.backend != AUTO:  # an explicit backend wins; its precision by the CPU's features
        precision = precision_for(s.engines.backend, s)
        return Choice(s.engines.backend, precision, f"{s.engines.backend} set; precision {precision} by this "
                                                   "machine's features"), None
    hit = cached(s)
    if hit is not None:
        return Choice(hit.backend, hit.precision, hit.reason + " (cached)", hit.measured_ms), None
    pairs, why = candidates(s)
    if s.engines.precision != AUTO:  # an explicit precision wins; the backends that run it
        from engines.artifacts import PRECISIONS

        pairs = [(b, s.engines.precision) for b in dict.fromkeys(b for b, _ in pairs) if s.engines.precision in PRECISIONS[b]]
        pairs = pairs or [("torch", s.engines.precision)]
    compiled = _compiled_key(s)
    note = f"; torch's rerank compiled for this host in {', '.join(compiled)}" if compiled else ""
    if len(pairs) == 1:
        choice = Choice(*pairs[0], f"{why}: {pairs[0][0]} {pairs[0][1]}{note}")
        _save(s, choice, compiled)
        return choice, None
    measured: dict[str, float] = {}
    best: tuple[float, tuple[str, str], Any] | None = None
    for backend, precision in pairs:
        concrete = s.model_copy(update={"engines": {"backend": backend, "precision": precision}})
        try:
            engines = load(concrete)
            ms = time_query(engines)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails to load or run is not chosen
            log.warning("auto: %s %s left out: %s: %s", backend, precision, type(exc).__name__, exc)
            continue
        measured[f"{backend} {precision}"] = round(ms, 1)
        if best is None or ms < best[0]:
            best = (ms, (backend, precision), engines)
        else:
            del engines
    if best is None:
        raise RuntimeError(f"auto: no engine configuration loaded on this machine (tried {pairs})")
    (backend, precision), engines = best[1], best[2]
    timing = ", ".join(f"{k} {v:.0f} ms" for k, v in measured.items()) + note
    choice = Choice(backend, precision, f"{why}: {backend} {precision} was fastest in the timed pass ({timing})",
                    measured)
    _save(s, choice, compiled)
    return choice, engines


def describe_host(s: WorkerSettings) -> str:
    """One line for ``imgsearch models check``: what a worker with these settings runs on this machine."""
    if AUTO not in (s.engines.backend, s.engines.precision):
        return f"engines: {s.engines.backend} {s.engines.precision} (set explicitly)"
    try:
        hit = cached(s)
    except Exception:  # noqa: BLE001 - models that do not resolve here: the rule alone
        hit = None
    if hit is not None:
        return f"engines: auto chose {hit.backend} {hit.precision} on this host: {hit.reason}"
    pairs, why = candidates(s)
    timed = " against ".join(f"{b} {p}" for b, p in pairs)
    return (f"engines: auto, not yet chosen on this host ({why}); a worker's first start "
            + (f"times {timed}" if len(pairs) > 1 else f"picks {timed}"))


if __name__ == "__main__":  # `python -m engines.auto`: choose now (and cache), with this environment's settings
    from engines.registry import resolve_auto
    from pipeline.settings import get_worker_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    concrete, _, how = resolve_auto(get_worker_settings())
    print(json.dumps({"backend": concrete.engines.backend, "precision": concrete.engines.precision, **(how or {})}))

"""Where built engines live and how a runtime finds them; shared by the builders and the runtimes.

Layout: ``{engine_dir}/{model version}/{graph}.{precision}.onnx`` (TensorRT adds the GPU and TensorRT
version to the folder name). The model version hashes the weights, so a changed checkpoint finds no engine
and the worker says which command builds it, rather than running a stale one.

The engine key covers the set of graphs a version needs (``GRAPHS``) and each graph's revision: a graph whose
export changes gets its revision raised, and its file a new name (``{graph}.r{revision}.{precision}.onnx``), so
a folder built before is completed by the next build (only what is missing is built) and never half-used: a
runtime asks for every graph of its model, at its revision, before it serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError

# model -> {graph: revision}. Raise a graph's revision whenever its export changes (inputs, outputs, what it
# computes); add a graph here and every runtime of that model asks for it.
GRAPHS: dict[str, dict[str, int]] = {
    "siglip": {"siglip_text": 1, "siglip_image": 1},
    "blip": {"blip_vision": 1, "blip_itc": 1, "blip_itm": 1,
             "blip_itm_rx": 3},  # rx: the reassociated ITM pass (2: its softmax over the last axis; 3: in int8,
    # its products with the image tokens in uint8 x int8 too)
}
SIGLIP_COMPONENTS = tuple(GRAPHS["siglip"])
BLIP_COMPONENTS = tuple(GRAPHS["blip"])
REVISIONS = {g: r for graphs in GRAPHS.values() for g, r in graphs.items()}
PRECISIONS = {"torch": ("fp32", "bf16", "fp16", "int8"), "onnxruntime": ("fp32", "int8"), "tensorrt": ("fp16", "fp32")}


class EngineMissing(ModelLoadError):
    code = "engine_missing"


@dataclass(frozen=True)
class Recipe:
    """How an int8 engine is quantized (ONNX Runtime's dynamic quantization: activations uint8 per run). Its name
    is part of every int8 engine's file name, so a folder built with another recipe is rebuilt, never served."""

    name: str
    unsigned: bool = False  # uint8 weights (ONNX Runtime's U8U8 kernels) instead of int8 (U8S8)
    reduce_range: bool = False  # 7-bit weights
    per_channel: bool = False  # a scale per output channel instead of one per tensor

    def options(self) -> dict[str, Any]:
        from onnxruntime.quantization import QuantType

        return {"weight_type": QuantType.QUInt8 if self.unsigned else QuantType.QInt8,
                "reduce_range": self.reduce_range, "per_channel": self.per_channel}


RECIPES = {r.name: r for r in (Recipe("s8"), Recipe("s8-rr", reduce_range=True),
                               Recipe("s8-rr-pc", reduce_range=True, per_channel=True),
                               Recipe("u8", unsigned=True), Recipe("u8-pc", unsigned=True, per_channel=True))}
# The choice, by measurement (python -m bench.int8; 2-core AMD EPYC Zen 4 with avx512_vnni, 2026-12-04):
#
#   recipe    kit text cos  kit ITM max diff  kit top-10  AVX2 probe   full-size text cos  text b1 / b16 ms
#   s8        0.9997        0.075             0.993       refused (*)  0.9997              22.9 / 307
#   s8-rr     0.9994        0.060             0.990       0.9990       0.9992              22.4 / 305
#   s8-rr-pc  0.9996        0.053             1.000       0.9992       0.9994              24.2 / 319
#   u8        0.9997        0.059             0.997       0.9992       0.9997              41.4 / 618
#   u8-pc     0.9998        0.054             0.997       0.9993       0.9997              42.6 / 610
#
# (*) "AVX2 probe": the self-check's probes under qemu-x86_64 -cpu Haswell (AVX2, no VNNI: ONNX Runtime's U8S8
# kernel there adds pairs of products in 16 bits, vpmaddubsw, and saturates). The old full-range recipe gave
# cosine 0.868 (text) and 0.918 (image) on the tiny random towers and an ITM error of 0.039, where the others give
# the same figures as natively. Every recipe but s8 is right on every x86 kind; uint8 weights (U8U8) are right
# but take the slower U8U8 kernels (1.8x on VNNI); per-channel scales buy a little agreement for 5% of the text
# tower's time. 7-bit weights keep the VNNI speed and hold the parity bounds, so: s8-rr.
INT8_RECIPE = RECIPES["s8-rr"]
# The rerank's reassociated graph's weight products are the few query rows' (its products with the image tokens
# round the tokens per token, engines/export.py ``_int8_image_attention``), so it takes uint8 weights per tensor
# whatever the recipe: right on every x86 kind, and the
# closest to fp32 of the recipes measured there (engines/export.py has the figures); the slower U8U8 kernels cost
# little on products of a few rows: 32 candidates, BLIP-base widths with 2 text layers, 1 thread, 8/16/24-token
# queries, 187/304/329 ms against 204/211/327 ms with int8 7-bit weights (the plain int8 pass: 436/560/940 ms);
# measured by hand once (no bench keeps it), on a loaded machine: read it as "about the same".
RX_RECIPE = RECIPES["u8"]


def onnx_path(engine_dir: Path, model_version: str, component: str, precision: str, recipe: str | None = None) -> Path:
    """``{component}.fp32.onnx``, or ``{component}.int8-{recipe}.onnx`` (the recipe ``engines build`` uses unless
    one is named)."""
    tag = f"int8-{recipe or INT8_RECIPE.name}" if precision == "int8" else precision
    return engine_dir / model_version / f"{graph_name(component)}.{tag}.onnx"


def graph_name(component: str) -> str:
    """``blip_itm_rx`` at revision 1 (every graph's first), ``blip_itm_rx.r2`` at revision 2."""
    revision = REVISIONS.get(component, 1)
    return component if revision == 1 else f"{component}.r{revision}"


def missing_graphs(engine_dir: Path, model_version: str, model: str, precision: str) -> list[str]:
    """The graphs of ``model`` ("siglip" or "blip") at their revisions that ``{engine_dir}/{model_version}`` lacks
    in ``precision`` (ONNX files)."""
    return [g for g in GRAPHS[model] if not onnx_path(engine_dir, model_version, g, precision).is_file()]


def require(path: Path, backend: str, precision: str) -> Path:
    if not path.is_file():
        raise EngineMissing(
            f"the {backend} {precision} engine {path.name} for {path.parent.name} is missing (looked in {path.parent}); "
            f"build it with `imgsearch engines build --backend {backend} --precision {precision}`")
    return path


def check_precision(backend: str, precision: str) -> None:
    """A known backend and a precision it runs; ``auto`` for either is resolved at load (engines/auto.py)."""
    if backend == "auto":
        if precision != "auto" and not any(precision in v for v in PRECISIONS.values()):
            raise ValueError(f"unknown engine precision {precision!r}")
        return
    if precision == "auto" and backend in PRECISIONS:
        return
    valid = PRECISIONS.get(backend)
    if valid is None:
        raise ValueError(f"unknown engine backend {backend!r}; valid: {', '.join(sorted(PRECISIONS))}")
    if precision not in valid:
        raise ValueError(f"precision {precision!r} is not available on {backend}; valid: {', '.join(valid)}")

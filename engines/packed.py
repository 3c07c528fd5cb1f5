"""Linear weights packed once for oneDNN, on a CPU in bf16: the rerank's and the query encoder's.

``torch.nn.functional.linear`` hands oneDNN the weight in its plain layout, and oneDNN copies it into its
blocked (AMX/VNNI) layout at every call: for products of a few dozen to a few hundred rows (a query's 64 tokens,
the rerank's 32 candidates x 8 tokens) that copy is a large part of the product. ``pack`` does it once at load,
per weight (``torch.ops.mkldnn._reorder_linear_weight``, as Inductor's freezing does), and ``linear`` runs
oneDNN's product on the packed weight, with BLIP's GELU in its epilogue where asked. On a 2-core Intel Xeon
with AMX, products of 256 rows ran 1.3x faster for 768 x 768 and 768 x 3,072 weights and 1.05x for 3,072 x 768;
BLIP-base's eager rerank 1.06 to 1.12x (``python -m bench.rerank`` times it against the unpacked pass) and SigLIP-base's text
encoding 1.27x (41 against 53 ms a query, a scratch comparison in one process).

``linear`` is a custom operator (``imgsearch::linear``): it finds a weight's packed form here by its address. A
weight with no packed form (or a call with gradients on, or not bf16 on a CPU) runs
``torch.nn.functional.linear``: the same product up to rounding. The compiled rerank (``engines/compiled.py``)
calls its C++ twin instead, ``imgsearch_native::packed_linear`` (``packed_op.cpp``, compiled with the package by
``build_native``), and still binds the engine's own plain weights: a package calling the Python operator waited
for the GIL at each of its 96 products, and ran 2x slower while another thread of the process ran Python
(599 against 314 ms unpacked, in a scratch comparison); the C++ one ran 1.09x faster than unpacked with or without
such a thread. ``ReassociatedItm.pack`` packs the rerank's layers, ``pack_linears`` a whole tower (SigLIP's text
tower: every ``nn.Linear`` becomes a ``PackedLinear``).

The packed copies add those weights once more to a worker's memory (BLIP-base's text layers 198 MB, SigLIP-base's
text tower 171 MB); ``IMGSEARCH_ENGINES__PACKED_WEIGHTS=off`` keeps them plain.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

# a weight's address -> (the weight, held weakly: its entry goes when it is freed; its packed form)
_PACKED: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
_LOCK = threading.Lock()
ROWS_HINT = 256  # the rows oneDNN's layout is chosen for: 32 candidates x 8 tokens
# the narrowest layers packed: BLIP-base's (768 wide) rerank ran 1.06x faster packed, the kit's (128 wide) 1.05x
# slower, its products too small for the copy saved to outweigh the operator's call (2-core AMX Xeon, bf16)
MIN_WIDTH = 512
NATIVE_SOURCE = Path(__file__).with_name("packed_op.cpp")
_native: Path | None = None  # the C++ operator's library, once loaded (load_native)


def available(dtype: torch.dtype, device: torch.device, width: int) -> bool:
    """Whether packed weights serve here: bf16 on a CPU where oneDNN runs it natively, in layers at least
    ``MIN_WIDTH`` wide. Not fp32: MKL's packed weights (``torch.ops.mkl._mkl_linear``, Inductor's for fp32) made
    BLIP-base's compiled fp32 rerank 1.04x faster and the eager one 1.01x on the AMX Xeon (a scratch comparison),
    too little to hold a second copy of the weights for."""
    return (width >= MIN_WIDTH and dtype == torch.bfloat16 and device.type == "cpu" and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack(weights: list[torch.Tensor]) -> int:
    """Packs each weight (out x in, bf16, on the CPU) for oneDNN, once; returns the bytes the packed forms hold."""
    added = 0
    with torch.no_grad(), _LOCK:
        for w in weights:
            entry = _PACKED.get(w.data_ptr())
            if entry is not None and entry[0]() is w:
                continue
            _PACKED[w.data_ptr()] = (weakref.ref(w), torch.ops.mkldnn._reorder_linear_weight(w.detach(), ROWS_HINT))
            weakref.finalize(w, _forget, w.data_ptr(), _PACKED[w.data_ptr()][0])
            if _native is not None:
                torch.ops.imgsearch_native.remember(w, _PACKED[w.data_ptr()][1])
            added += w.numel() * w.element_size()
    return added


def _forget(address: int, ref: weakref.ref[torch.Tensor]) -> None:
    with _LOCK:
        if address in _PACKED and _PACKED[address][0] is ref:
            del _PACKED[address]
            if _native is not None:
                torch.ops.imgsearch_native.forget(address)


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight``'s packed form, if ``pack`` made one for this very tensor."""
    entry = _PACKED.get(weight.data_ptr())
    if entry is None:
        return None
    held = entry[0]()  # the very weight, not another view of its bytes (a square weight's transpose has its address)
    if held is None or held.shape != weight.shape or held.stride() != weight.stride() or held.dtype != weight.dtype:
        return None
    return entry[1]


@torch.library.custom_op("imgsearch::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """``x @ weight.T + bias``, then GELU (erf) if ``gelu``: on ``weight``'s packed form where there is one."""
    w = packed(weight) if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" else None
    if w is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "gelu" if gelu else "none", [],  # type: ignore[no-any-return]
                                                  "none" if gelu else "")
    out = nn.functional.linear(x, weight, bias)
    return nn.functional.gelu(out) if gelu else out


@linear.register_fake
def _shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def op() -> Any:
    """The operator a pass calls for its packed products: while it is compiled, the C++ one where its library is
    loaded (the package then runs without Python: ``build_native``), else ``imgsearch::linear``."""
    if _native is not None and torch.compiler.is_compiling():
        return torch.ops.imgsearch_native.packed_linear
    return torch.ops.imgsearch.linear


def native_path(engine_dir: Path) -> Path:
    """``{engine_dir}/native/imgsearch_packed-{tag}.so``, the tag naming torch's version, the compiler and the
    source: what the library depends on."""
    from engines.compiled import compiler

    stamp = f"{torch.__version__}\n{compiler()}\n".encode() + NATIVE_SOURCE.read_bytes()
    return engine_dir / "native" / f"imgsearch_packed-{hashlib.sha256(stamp).hexdigest()[:12]}.so"


def build_native(engine_dir: Path) -> Path:
    """Compiles ``packed_op.cpp`` (``imgsearch_native::packed_linear``, the compiled rerank's product on a packed
    weight, with no Python in it) against this torch, once: about 10 s with g++. A worker loads it with the
    package that calls it (``engines/compiled.py``)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    from engines.compiled import compiler

    path = native_path(engine_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    cmd = [compiler(), "-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *(f"-I{p}" for p in include_paths()), str(NATIVE_SOURCE), "-o", str(tmp),
           *(f"-L{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch", *(f"-Wl,-rpath,{p}" for p in libs)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"compiling {NATIVE_SOURCE.name} failed: {done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_native(path: Path) -> None:
    """Loads the C++ operator's library (once a process) and files every packed weight with it."""
    global _native
    if _native is not None:
        return  # a process registers the operator once; every build of the same source is the same code
    torch.ops.load_library(str(path))
    torch.library.register_fake("imgsearch_native::packed_linear")(_shape)
    with _LOCK:
        for ref, form in _PACKED.values():
            w = ref()
            if w is not None:
                torch.ops.imgsearch_native.remember(w, form)
        _native = path


def native_loaded() -> bool:
    return _native is not None


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose product runs on its packed weight (``linear``) where one is made, except in a pass with
    gradients or a trace (``pack_linears`` turns a model's linear layers into these, keeping their parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_wanted():
            return super().forward(x)
        return torch.ops.imgsearch.linear(x, self.weight, self.bias, False)  # type: ignore[no-any-return]


def pack_linears(module: nn.Module) -> int:
    """Packs the weight of every ``nn.Linear`` under ``module`` and puts a ``PackedLinear`` holding the same
    parameters in its place; returns the bytes added."""
    weights = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            swapped = PackedLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            swapped.weight, swapped.bias = child.weight, child.bias
            setattr(parent, name, swapped)
            weights.append(child.weight)
    return pack(weights)


def in_use(module: Any) -> bool:
    """Whether a pass should call ``linear``: its weights are packed (``module.packed``), no gradient is wanted (the
    explain path's), and it is not being traced for ONNX (whose graph keeps plain MatMuls)."""
    return bool(getattr(module, "packed", False)) and not _plain_wanted()


def _plain_wanted() -> bool:
    """A pass that wants gradients (a custom operator has none) or is traced for ONNX runs the plain products."""
    return torch.is_grad_enabled() or torch.jit.is_tracing()

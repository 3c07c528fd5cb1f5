"""Linear weights packed once for oneDNN, on a CPU in bf16: the rerank's and the query encoder's.

``torch.nn.functional.linear`` hands oneDNN the weight in its plain layout, and oneDNN copies it into its
blocked (AMX/VNNI) layout at every call: for products of a few dozen to a few hundred rows (a query's 64 tokens,
the rerank's 32 candidates x 8 tokens) that copy is a large part of the product. ``pack`` does it once at load,
per weight (``torch.ops.mkldnn._reorder_linear_weight``, as Inductor's freezing does), and ``linear`` runs
oneDNN's product on the packed weight, with BLIP's GELU in its epilogue where asked. On a 2-core Intel Xeon
with AMX, products of 256 rows ran 1.3x faster for 768 x 768 and 768 x 3,072 weights and 1.05x for 3,072 x 768;
BLIP-base's rerank 1.06x (``python -m bench.rerank`` times it against the unpacked pass) and SigLIP-base's text
encoding 1.27x (41 against 53 ms a query, a scratch comparison in one process).

``linear`` is a custom operator (``imgsearch::linear``), so the compiled rerank (``engines/compiled.py``) calls it
too: the package binds the engine's own plain weights as before, and the operator finds each one's packed form
here by its address. A weight with no packed form (or a call with gradients on, or not bf16 on a CPU) runs
``torch.nn.functional.linear``: the same product up to rounding. ``ReassociatedItm.pack`` packs the rerank's
layers, ``pack_linears`` a whole tower (SigLIP's text tower: every ``nn.Linear`` becomes a ``PackedLinear``).

The packed copies add those weights once more to a worker's memory (BLIP-base's text layers 198 MB, SigLIP-base's
text tower 171 MB); ``IMGSEARCH_ENGINES__PACKED_WEIGHTS=off`` keeps them plain.
"""

from __future__ import annotations

import threading
import weakref
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


def available(dtype: torch.dtype, device: torch.device, width: int) -> bool:
    """Whether packed weights serve here: bf16 on a CPU where oneDNN runs it natively, layers ``width`` wide
    at least ``MIN_WIDTH``. Not fp32: MKL's packed
    weights (``torch.ops.mkl._mkl_linear``, Inductor's for fp32) made BLIP-base's compiled fp32 rerank 1.04x
    faster and the eager one 1.01x on the AMX Xeon, too little to hold a second copy of the weights for."""
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
            added += w.numel() * w.element_size()
    return added


def _forget(address: int, ref: weakref.ref[torch.Tensor]) -> None:
    with _LOCK:
        if address in _PACKED and _PACKED[address][0] is ref:
            del _PACKED[address]


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
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose product runs on its packed weight (``linear``) where one is made, except in a pass with
    gradients or a trace (``pack_linears`` turns a model's linear layers into these, keeping their parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing():
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
    return bool(getattr(module, "packed", False)) and not torch.is_grad_enabled() and not torch.jit.is_tracing()

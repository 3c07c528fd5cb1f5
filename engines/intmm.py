"""torch int8 on a CPU: the rerank's products in oneDNN's s8 x s8 (``torch._int_mm``), for CPUs without native bf16.

Every operand is rounded with a scale of its own per row (an image token, a row of the query's keys, a text row, a
weight's output channel), so the sums are exact integers and the only error is the rounding
(``python -m bench.int8_attention`` measured these ranges on the model kit before this was built):

- the image tokens ``X`` (P x E per candidate) to 7 bits (63) per token, once a call;
- the scores ``(Q_h W_k,h) X^T``: the keys per row at 8 bits, times ``X_q^T``, then both scales;
- after the softmax, ``P * s_x`` (the tokens' scales folded in) per row to 8 bits unsigned (255); ``_int_mm`` is
  s8 x s8, so ``P_u8 - 128`` goes in and ``128 * colsum(X_q)`` (one vector per candidate, exact) comes back;
- the text layers' linear weights (``Int8Linear``) per output channel, their input rows per row at 8 bits.

Why 7 bits for the tokens and (where needed) for the weights: on a CPU with AVX2 but no VNNI, oneDNN's s8 x s8
adds 128 to the first operand and sums u8 x s8 pairs in 16 bits (``vpmaddubsw``), which saturate unless the second
operand stays within 7 bits (2 x 255 x 63 < 32,767). The image tokens are the second operand of both attention
products; the weights keep 7 bits where a probe (``full_range``) finds full-range sums inexact on this CPU.

Each int8 pass is checked at load against its float pass on a probe (``check``), within the ONNX Runtime int8
self-check's bounds (``engines/selfcheck.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

TOKENS = 63  # the image tokens' range: the second operand of both attention products, right on every x86 kind
ROWS = 127  # the first operand's range: query keys, text rows
PROBS = 255  # the probabilities' range (unsigned)


@functools.cache
def available() -> bool:
    """Whether this torch runs ``_int_mm`` on a CPU (oneDNN built in)."""
    try:
        a = torch.ones(4, 8, dtype=torch.int8)
        return bool(torch._int_mm(a, a.t().contiguous()).eq(8).all())
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def fast() -> bool:
    """Whether torch sends ``_int_mm`` to oneDNN's s8 x s8 kernels on this CPU: torch 2.13 does only where cpuinfo
    reports ``avx512_vnni`` (and oneDNN is enabled). Elsewhere (AVX2 alone, as on AMD EPYC before Zen 4; AVX-512
    without VNNI; AVX-VNNI alone) it runs a reference loop, exact but far slower than fp32's products (a 2-core AMX
    Xeon made an AVX2-only CPU with ``bench.cpumask avx2``, 264 x 768 by 768 x 768: 72 ms, 29 with the second
    operand transposed, against 1.6 ms in fp32), so there torch int8 is never ``auto``'s choice. oneDNN's ISA cap
    does not change this: it caps the kernels oneDNN runs, not whether torch calls them."""
    from engines.auto import TORCH_INT8_FLAG

    caps = torch.cpu.get_capabilities()  # cpuinfo's own names, as torch asks it
    return bool(available() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and caps.get(TORCH_INT8_FLAG))


def require(device: torch.device) -> None:
    """torch int8 runs on a CPU (oneDNN's s8 x s8 through ``torch._int_mm``); a GPU runs fp16. Where torch runs its
    reference loop instead (``fast``), an explicit setting still runs, with a warning: it is right, but slow."""
    if device.type != "cpu" or not available():
        raise ValueError(f"torch int8 runs on a CPU with oneDNN (here {device.type}); a GPU runs --precision fp16")
    if not fast():
        log.warning("torch int8 on a CPU without avx512_vnni: torch runs its int8 products in a reference loop here, "
                    "many times slower than fp32 (engines/intmm.py `fast`); the default (auto) never picks it")


@functools.cache
def transposed() -> bool:
    """Whether the products' second operands go in as the transpose of a row-major N x K block (a view of a weight
    as ``nn.Linear`` keeps it, or of the image tokens laid out E x P) rather than as K x N: on x86 without VNNI.
    There torch's reference loop (``fast``) ran 2.5x faster that way (29 against 72 ms for 264 x 768 by 768 x 768),
    and so did oneDNN's AVX2 kernels where a cap sends torch to them on a CPU with VNNI (held to AVX2 on a 2-core
    AMX Xeon: 1.57 against 2.45 ms for that product, 6.8 against 8.6 ms by 3,072 x 768, 0.53 against 0.75 ms for a
    candidate's probabilities by its 577 x 768 tokens); with VNNI the two ran alike. By the CPU's flags as oneDNN
    runs them (``engines.auto.cpu``: a cap in ``ONEDNN_MAX_CPU_ISA`` counts)."""
    from engines.auto import VNNI_FLAGS, cpu

    return not set(VNNI_FLAGS) & cpu()[1]


def operand(q: torch.Tensor) -> torch.Tensor:
    """The second operand of ``_int_mm`` for the rows of ``q`` (N x K, int8: a weight's output channels), laid out as
    this CPU's products run fastest (``transposed``)."""
    return q.t() if transposed() else q.t().contiguous()


@functools.cache
def full_range() -> bool:
    """Whether ``_int_mm``'s sums are exact with a full-range second operand on this CPU (false on AVX2 without
    VNNI, where they saturate: weights then keep 7 bits), at the weight products' shapes (a text layer's 768 and
    3,072 wide inputs, 256 rows) and with the operand laid out as ``Int8Linear`` keeps it."""
    g = torch.Generator().manual_seed(0)
    for k in (768, 3072):
        a = torch.randint(-127, 128, (256, k), dtype=torch.int8, generator=g)
        a[:, : k // 2] = 127  # pairs of 127 x 127 (plus oneDNN's 128): past 16 bits where a kernel sums pairs in 16
        w = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=g)
        w[:32, : k // 2] = 127
        b = operand(w)
        if not torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double()):
            return False
    return True


def rounded(t: torch.Tensor, top: int, inplace: bool = False,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (float) as integers of magnitude at most ``top`` with a scale per row (its last axis): int8 and the
    float scales (..., 1). ``top`` 255 is for non-negative ``t`` (probabilities) and comes back shifted by -128;
    ``inplace`` lets ``t`` be overwritten; ``out`` (int8, ``t``'s shape, any strides) takes the integers, so a
    caller lays them out as its product reads them in the same pass as the cast."""
    if top > 127:
        big = t.amax(dim=-1, keepdim=True)
    else:  # both ends read, no |t| written out (aminmax ran 5x slower than abs and amax on a CPU in torch 2.13)
        big = torch.maximum(t.amax(dim=-1, keepdim=True), t.amin(dim=-1, keepdim=True).neg_())
    scale = big.clamp_min_(1e-12).div_(top)
    q = t.div_(scale) if inplace else t / scale
    q = q.round_()
    if top > 127:
        q = q.sub_(128)
    return (q.to(torch.int8) if out is None else out.copy_(q)), scale


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[i] @ b[i]`` for each candidate (``b[i]`` K x N, any strides), int8 in, int32 out."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.int32)
    for i in range(a.shape[0]):
        torch._int_mm(a[i], b[i], out=out[i])
    return out


class ImageTokens:
    """A call's image tokens (B x P x E, float) rounded once: ``q`` (int8, 7-bit), ``scale`` (B x 1 x P, laid out
    for the scores), for the probabilities' shift ``shift`` (B x 1 x E: 128 times the column sums of ``q``) and,
    where this CPU's products want their second operand transposed (``transposed``), ``qt`` (B x E x P).
    One candidate at a time, so each pass over its tokens stays in cache (on 32 BLIP-base candidates, 2-core AMX
    Xeon: 8 against 33 ms at once), and the column sums as a product with a row of ones (1 against 14 ms for
    ``sum``; held to AVX2, 2.8 against 14 ms with the tokens as ``values`` lays them out rather than as ``q``)."""

    def __init__(self, x: torch.Tensor) -> None:
        b, p, e = x.shape
        self.q = torch.empty(x.shape, dtype=torch.int8)
        self.qt = torch.empty(b, e, p, dtype=torch.int8) if transposed() else None
        scale = torch.empty(b, p, 1)
        for i in range(b):
            self.q[i], scale[i] = rounded(x[i].float(), TOKENS)
            if self.qt is not None:
                self.qt[i].t().copy_(self.q[i])
        self.scale = scale.transpose(1, 2)
        self.shift = _products(torch.ones(1, 1, p, dtype=torch.int8).expand(b, 1, p), self.values()).float().mul_(128)

    def values(self) -> torch.Tensor:
        """The second operand of the weighted tokens' product (B x P x E, laid out as ``transposed`` says)."""
        return self.q if self.qt is None else self.qt.transpose(1, 2)

    def scores(self, keys: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``keys X^T`` (B x HR x P, float) for the keys B x HR x E, or H x B x R x E as the pass makes them (rounded
        straight into the B x HR x E order the product reads: no float copy to lay them out); ``inplace`` lets
        ``keys`` be overwritten."""
        if keys.dim() == 3:
            kq, ks = rounded(keys.float(), ROWS, inplace=inplace)
        else:
            h, b, r, e = keys.shape
            kq = torch.empty(b, h, r, e, dtype=torch.int8)
            _, ks = rounded(keys.float(), ROWS, inplace=inplace, out=kq.transpose(0, 1))
            kq, ks = kq.view(b, h * r, e), ks.transpose(0, 1).reshape(b, h * r, 1)
        # to float first, then in place: a product of int32 and float ran at half the speed (a casting loop)
        return _products(kq, self.q.transpose(1, 2)).to(torch.float32).mul_(ks).mul_(self.scale)

    def weighted(self, probs: torch.Tensor, inplace: bool = False, heads: int | None = None) -> torch.Tensor:
        """``probs X`` (B x HR x E, float) for the softmax B x HR x P (overwritten with ``inplace``); with ``heads``
        H x BR x E, the heads first as the value weights' product reads them (written so: no copy to lay them out)."""
        p = probs.mul_(self.scale) if inplace else probs * self.scale
        pq, ps = rounded(p, PROBS, inplace=True)
        sums = _products(pq, self.values())
        if heads is None:
            return torch.add(sums, self.shift).mul_(ps)
        b, hr, e = sums.shape
        out = torch.empty(heads, b, hr // heads, e)
        view = out.transpose(0, 1)                                                     # B x H x R x E
        torch.add(sums.view(b, heads, -1, e), self.shift.view(b, 1, 1, e), out=view)
        view.mul_(ps.view(b, heads, -1, 1))
        return out.view(heads, -1, e)


class Int8Linear(nn.Module):
    """``nn.Linear`` on int8: the weight rounded per output channel once (7 bits where ``full_range`` is false),
    each call's input rows per row; float32 out."""

    wt: torch.Tensor  # in x out, int8: _int_mm's second operand (a view of out x in where ``transposed``)
    scale: torch.Tensor  # per output channel
    bias: torch.Tensor | None

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        w = dense.weight.detach().float()
        q, scale = rounded(w, 127 if full_range() else 63)
        self.register_buffer("wt", operand(q))
        self.register_buffer("scale", scale.view(-1))
        self.register_buffer("bias", None if dense.bias is None else dense.bias.detach().float())
        self.out_features = dense.out_features

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("int8 products have no gradient: run the float weights (ReassociatedItm does)")
        lead = x.shape[:-1]
        xq, xs = rounded(x.reshape(-1, x.shape[-1]).float(), ROWS)
        y = torch.mul(torch._int_mm(xq, self.wt), xs).mul_(self.scale)
        b = self.bias if bias is None else bias
        if b is not None:
            y = y.add_(b)
        return y.view(*lead, self.out_features)


def quantize_linears(module: nn.Module) -> int:
    """Puts an ``Int8Linear`` in place of every ``nn.Linear`` under ``module`` (SigLIP's text tower); returns the
    bytes its int8 weights hold. The float weights go with the modules replaced."""
    added = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                swapped = Int8Linear(child)
                setattr(parent, name, swapped)
                added += swapped.wt.numel()
    return added


def check(name: str, run: Callable[[], dict[str, Any]], quantize: Callable[[], Any]) -> Any:
    """Quantizes (``quantize``) between two runs of a probe (``run``: outputs by name, ITM among them where the
    pass has it) and holds int8 to the ONNX Runtime int8 self-check's bounds against the float run
    (``engines/selfcheck.py``): ``Int8Disagrees`` where this CPU's kernels are not right. Returns ``quantize``'s
    result."""
    from engines import selfcheck

    with torch.inference_mode():
        want = run()
        out = quantize()
        got = run()
    agreement = selfcheck.refuse_unless_ok(selfcheck.compare(name, got, want))
    log.info("%s", agreement.line())
    return out

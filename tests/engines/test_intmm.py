"""torch int8 (engines/intmm.py): its products against float ones, right on AVX2 without VNNI (in oneDNN's s8 x s8
kernels there, which sum pairs in 16 bits, and in torch's reference loop, which an AVX2-only CPU runs), and the
engines it makes (the explain path's Grad-CAM on the float weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from engines import intmm

pytestmark = pytest.mark.skipif(not intmm.available(), reason="this torch has no CPU int8 products")


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """The error relative to the reference's size."""
    return float((got - want).norm() / want.norm())


def errors(top: int | None = None) -> dict[str, float]:
    """Relative errors of a linear layer, the scores and the weighted tokens in int8 against fp32 (seeded); with
    ``top``, the linear layer's weight rounded to that range whatever the CPU (the test's negative control)."""
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(256, 384)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(384, 256, generator=g) * 0.05)
    x = torch.randn(40, 256, generator=g)
    q = intmm.Int8Linear(dense)
    if top is not None:
        w, scale = intmm.rounded(dense.weight.detach().clone(), top)
        q.wt, q.scale = intmm.operand(w), scale.view(-1)
    xq, _ = intmm.rounded(x.clone(), intmm.ROWS)
    tokens = torch.randn(3, 50, 64, generator=g)
    keys = torch.randn(3, 12, 64, generator=g)
    rounded = intmm.ImageTokens(tokens)
    probs = torch.softmax(keys @ tokens.transpose(1, 2) / 8, dim=-1)
    kq, _ = intmm.rounded(keys.clone(), intmm.ROWS)
    pq, _ = intmm.rounded(probs.clone(), intmm.PROBS)
    tq = rounded.q.double()
    exact = (torch.equal(torch._int_mm(xq, q.wt).double(), xq.double() @ q.wt.double())  # no pair sum saturated:
             and torch.equal(intmm._products(kq, rounded.q.transpose(1, 2)).double(), kq.double() @ tq.transpose(1, 2))
             and torch.equal(intmm._products(pq, rounded.values()).double(), pq.double() @ tq))
    with torch.inference_mode():
        return {"linear": _err(q(x), dense(x)), "scores": _err(rounded.scores(keys), keys @ tokens.transpose(1, 2)),
                "weighted": _err(rounded.weighted(probs), probs @ tokens), "full_range": float(intmm.full_range()),
                "exact": float(exact), "transposed": float(intmm.transposed()), "onednn": float(intmm.fast())}


def test_int8_products_are_within_a_percent_or_two_of_fp32() -> None:
    got = errors()
    assert got["exact"] == 1.0, got
    assert got["linear"] < (0.01 if got["full_range"] else 0.02) and got["scores"] < 0.02 and got["weighted"] < 0.02, got


def test_the_heads_first_layouts_give_the_numbers_of_the_candidates_first_ones() -> None:
    """The pass hands its keys over heads first (H x B x R x E, as their product makes them; after layer 0's gather
    a strided view of B x H x R x E) and takes the weighted tokens back heads first (H x BR x E): the same numbers
    as in the candidates-first layout, bit for bit, only laid out for the next product."""
    g = torch.Generator().manual_seed(1)
    h, b, r, p, e = 4, 3, 5, 40, 32
    tokens = intmm.ImageTokens(torch.randn(b, p, e, generator=g))
    keys = torch.randn(h, b, r, e, generator=g)
    want = tokens.scores(keys.transpose(0, 1).reshape(b, h * r, e))
    assert torch.equal(tokens.scores(keys.clone(), inplace=True), want)
    strided = keys.transpose(0, 1).contiguous().transpose(0, 1)  # as layer 0's gathered keys come
    assert not strided.is_contiguous() and torch.equal(tokens.scores(strided, inplace=True), want)
    probs = torch.softmax(want, dim=-1)
    heads_first = tokens.weighted(probs.clone(), heads=h)
    assert heads_first.shape == (h, b * r, e)
    flat = tokens.weighted(probs.clone())
    assert torch.equal(heads_first, flat.view(b, h, r, e).transpose(0, 1).reshape(h, b * r, e))
    assert not torch.equal(heads_first, flat.view(h, b * r, e))  # the two layouts do differ


def test_int8_is_right_on_avx2_without_vnni() -> None:
    """With oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA``) on a CPU with VNNI, torch still sends its int8 products to
    oneDNN (``intmm.fast``), which runs its AVX2 kernels: no real CPU runs that way in torch 2.13 (an AVX2-only one
    gets torch's reference loop: the next test, and tests/bench/test_cpumask.py), but a torch that sends them there
    would. There the probe finds the 16-bit pair sums, weights keep 7 bits and every integer sum (the linear and both
    attention products) is exact; a weight rounded to the full 8 bits gives wrong sums, as the probe says."""
    code = ("import json, tests.engines.test_intmm as t; "
            "print(json.dumps({'ours': t.errors(), 'full': t.errors(top=127)}))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ours"]["linear"] < 0.02 and got["ours"]["scores"] < 0.02 and got["ours"]["weighted"] < 0.02, got
    assert got["ours"]["exact"] == 1.0, got
    assert got["ours"]["transposed"] == 1.0, got  # without VNNI the second operands go in transposed: checked there
    assert got["ours"]["onednn"] == float(intmm.fast()), got  # a cap does not change where torch sends them
    # the probe's answer is what full-range weights give there (in torch 2.13: saturated sums, so 7-bit weights)
    assert got["ours"]["full_range"] == got["full"]["exact"], got


@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="qemu-user is not installed (make test installs it)")
def test_int8_is_right_on_an_emulated_haswell() -> None:
    """Right on a CPU that is AVX2 without VNNI to every library's detection (qemu-user emulating a Haswell). There
    torch runs its int8 products in its reference loop, not oneDNN (``intmm.fast`` says so), whose full-range sums
    are exact (the probe says so, and weights keep 8 bits); either way every integer sum must be."""
    code = "import json, tests.engines.test_intmm as t; print(json.dumps(t.errors()))"
    out = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["exact"] == 1.0 and got["linear"] < 0.02 and got["scores"] < 0.02 and got["weighted"] < 0.02, got
    assert got["onednn"] == 0.0, got


def test_an_int8_engine_explains_on_its_float_weights(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """Grad-CAM differentiates through the attention: an int8 engine runs it on its float weights (the same maps as
    an fp32 engine's), and its attention maps come from its own int8 pass (close to fp32's)."""
    from engines import explain
    from engines.blip import TorchBlip

    blip_dir = tiny_models.blip
    fp32, int8 = TorchBlip(str(blip_dir)), TorchBlip(str(blip_dir), precision="int8")
    assert int8.cores.rx.int8 and not fp32.cores.rx.int8
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((fp32.shape["patches"], fp32.shape["width"])).astype(np.float16) for _ in range(3)]
    want = explain.explain(fp32, "a red circle", feats, method="gradcam")
    got = explain.explain(int8, "a red circle", feats, method="gradcam")
    assert all(np.allclose(g.grid, w.grid, atol=1e-6) for g, w in zip(got, want, strict=True))
    itm8, maps8 = explain.attention_maps(int8, "a red circle", feats)
    itm, maps = explain.attention_maps(fp32, "a red circle", feats)
    assert not np.array_equal(itm8, itm) and np.abs(itm8 - itm).max() < 0.05  # the int8 pass ran, and stayed close
    assert all(np.abs(g.grid - w.grid).max() < 0.05 for g, w in zip(maps8, maps, strict=True))


def test_torch_int8_runs_on_a_cpu_only(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from engines.blip import TorchBlip

    with pytest.raises(ValueError, match="torch int8 runs on a CPU"):
        TorchBlip(str(tiny_models.blip), precision="int8", device="meta")


def test_an_int8_pass_that_disagrees_with_float_is_refused_at_load(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The load-time check against the float pass on a probe (the ONNX Runtime int8 self-check's bounds): products
    that come out wrong on this CPU (here: made 40% too large) refuse the engine with one line."""
    from engines.selfcheck import Int8Disagrees
    from engines.siglip import TorchSiglip

    right = intmm.Int8Linear.forward
    monkeypatch.setattr(intmm.Int8Linear, "forward", lambda self, x, bias=None: right(self, x, bias) * 1.4 + 0.3)
    with pytest.raises(Int8Disagrees, match="int8 self-check of .*siglip_text \\(torch int8\\): cosine to fp32"):
        TorchSiglip(str(tiny_models.siglip), precision="int8")

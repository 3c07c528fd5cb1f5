"""The rerank's linear weights packed once for oneDNN in bf16 (engines/packed.py): the same products on the packed
form, found for the very weight it was made from and no other view of its bytes, gone with the weight; the torch
backend's pass, eager and compiled, runs its products on them with the scores it gives unpacked; a pass that wants gradients (the
explain path's Grad-CAM) keeps the plain products, and fp32 packs nothing."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

from engines import compiled, packed
from engines.blip import TorchBlip
from engines.siglip import TorchSiglip

pytestmark = pytest.mark.skipif(not packed.available(torch.bfloat16, torch.device("cpu"), width=768),
                                reason="weights are packed where oneDNN runs bf16 natively (avx512_bf16 or AMX): not here")


def _onednn_calls(fn) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """``fn()`` and how many of oneDNN's products on a packed weight it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name == "mkldnn::_linear_pointwise")


def test_a_product_on_a_packed_weight_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 48).bfloat16(), torch.randn(96).bfloat16(), torch.randn(3, 5, 48).bfloat16()
    want = nn.functional.linear(x, w, b)
    assert packed.packed(w) is None
    plain, calls = _onednn_calls(lambda: torch.ops.imgsearch.linear(x, w, b, False))
    assert calls == 0 and torch.equal(plain, want)  # nothing packed: the plain product
    assert packed.pack([w]) == w.numel() * 2 and packed.pack([w]) == 0  # packed once
    for gelu in (False, True):
        got, calls = _onednn_calls(lambda: torch.ops.imgsearch.linear(x, w, b, gelu))  # noqa: B023
        expected = nn.functional.gelu(want.float()) if gelu else want.float()
        assert calls == 1 and got.shape == (3, 5, 96)
        # bf16 rounding of sums of 48 products, and of GELU's input
        torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.02)


def test_another_view_of_a_packed_weights_bytes_is_not_taken_for_it() -> None:
    torch.manual_seed(1)
    w, x = torch.randn(64, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    packed.pack([w])
    assert packed.packed(w) is not None
    assert packed.packed(w.t()) is None  # same address, same shape: the transpose
    got, calls = _onednn_calls(lambda: torch.ops.imgsearch.linear(x, w.t(), None, False))
    assert calls == 0 and torch.equal(got, nn.functional.linear(x, w.t()))


def test_a_freed_weight_leaves_no_packed_form_behind() -> None:
    w = torch.randn(32, 16).bfloat16()
    packed.pack([w])
    address = w.data_ptr()
    assert address in packed._PACKED
    del w
    gc.collect()
    assert address not in packed._PACKED


def test_the_rerank_runs_on_packed_weights_with_the_scores_it_gives_unpacked(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert TorchBlip(str(tiny_models.blip), precision="bf16", compiled="off").packed_bytes == 0  # too narrow to pay
    monkeypatch.setattr(packed, "MIN_WIDTH", 1)  # as if it were as wide as BLIP-base
    blip = TorchBlip(str(tiny_models.blip), precision="bf16", compiled="off")
    rx = blip.cores.rx
    layers = len(blip.model.text_encoder.encoder.layer)
    assert rx.packed and blip.packed_bytes > 0
    rng = np.random.default_rng(3)
    feats = [rng.standard_normal((blip.shape["patches"], blip.shape["width"])).astype(np.float16) for _ in range(6)]
    got, calls = _onednn_calls(lambda: blip.score("a red circle on white", feats))
    # each layer's eight linear products (the last layer's too, on its [CLS] row)
    assert calls == 8 * layers
    rx.packed = False
    want, calls = _onednn_calls(lambda: blip.score("a red circle on white", feats))
    assert calls == 0
    assert np.ptp(want[0]) > 0  # the candidates differ: equal arrays could tell
    np.testing.assert_allclose(got[0], want[0], atol=0.02)  # ITM, bf16 either way
    np.testing.assert_allclose(got[1], want[1], atol=0.02)  # cosine


def test_a_pass_that_wants_gradients_or_runs_fp32_keeps_the_plain_products(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(packed, "MIN_WIDTH", 1)
    rx = TorchBlip(str(tiny_models.blip), precision="bf16", compiled="off").cores.rx
    with torch.inference_mode():
        assert packed.in_use(rx)
    with torch.enable_grad():
        assert not packed.in_use(rx)  # the explain path's gradients: a custom operator has none
    fp32 = TorchBlip(str(tiny_models.blip), precision="fp32", compiled="off")
    assert fp32.packed_bytes == 0 and not fp32.cores.rx.packed
    with torch.inference_mode():
        assert not packed.in_use(fp32.cores.rx)


@pytest.mark.skipif(not compiled.has_compiler(), reason="AOTInductor compiles C++ with g++ (or $CXX): none here")
def test_the_compiled_pass_runs_its_products_on_the_engines_packed_weights(tiny_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(packed, "MIN_WIDTH", 1)
    eager = TorchBlip(str(tiny_models.blip), precision="bf16", compiled="off")
    path = compiled.build(eager, tmp_path)  # checked against the eager pass before it is kept
    fast = TorchBlip(str(tiny_models.blip), precision="bf16", compiled="on", engine_dir=tmp_path)
    assert fast.compiled is not None and fast.cores.rx.packed
    layers = len(fast.model.text_encoder.encoder.layer)
    rng = np.random.default_rng(4)
    feats = [rng.standard_normal((fast.shape["patches"], fast.shape["width"])).astype(np.float16) for _ in range(5)]
    python_calls = []
    monkeypatch.setattr(packed, "packed", lambda w: python_calls.append(w) or None)  # the Python operator's lookup
    got, calls = _onednn_calls(lambda: fast.score("two green triangles", feats))
    # the package calls the C++ operator, which finds this engine's packed weights; no call takes Python's GIL
    assert calls == 8 * layers and python_calls == []
    assert packed.native_loaded() and compiled._record(path)["native"] == packed.native_path(tmp_path).name
    want = eager.score("two green triangles", feats)
    assert np.ptp(want[0]) > 0
    np.testing.assert_allclose(got[0], want[0], atol=0.02)
    np.testing.assert_allclose(got[1], want[1], atol=0.02)


def test_the_query_encoder_runs_on_packed_weights_with_the_vectors_it_gives_unpacked(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(packed, "MIN_WIDTH", 1)
    fast = TorchSiglip(str(tiny_models.siglip), precision="bf16")
    plain = TorchSiglip(str(tiny_models.siglip), precision="bf16", packed=False)
    assert fast.packed_bytes > 0 and plain.packed_bytes == 0
    layers = [m for m in fast.model.text_model.modules() if isinstance(m, nn.Linear)]
    linears = len(layers)
    assert linears and all(isinstance(m, packed.PackedLinear) for m in layers)
    texts = ["a red circle", "two green triangles on a white field"]
    got, calls = _onednn_calls(lambda: fast.encode_text(texts))
    assert calls == linears  # every linear layer of the text tower, once
    want, calls = _onednn_calls(lambda: plain.encode_text(texts))
    assert calls == 0
    cos = (np.asarray(got, np.float32) * np.asarray(want, np.float32)).sum(1)  # unit vectors
    assert cos.min() > 0.999 and abs(float(got[0] @ got[1])) < 0.999  # the two texts' vectors differ


def test_packing_is_off_by_the_setting(tiny_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from engines.registry import load_engines
    from tests.conftest import make_settings

    monkeypatch.setattr(packed, "MIN_WIDTH", 1)
    for setting, want in (("auto", True), ("off", False)):
        s = make_settings(tmp_path, tiny_models, engine_precision="bf16")
        s = s.model_copy(update={"engines": s.engines.model_copy(update={"packed_weights": setting})})
        e = load_engines(s)
        assert (e.text.packed_bytes > 0) is want and (e.reranker.packed_bytes > 0) is want
        assert e.reranker.cores.rx.packed is want

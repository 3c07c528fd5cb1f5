"""Stored features kept in the engine's compute dtype (``stored_form``): the torch bf16 backend keeps bfloat16 in
the worker's feature source, scores them without converting, and gives the same numbers as from float16."""

from __future__ import annotations

import numpy as np
import pytest

from engines.blip import TorchBlip
from pipeline import features as featcodec
from pipeline.breaker import Breaker
from pipeline.cache import LocalLRU
from pipeline.layout import feature_key
from pipeline.search.feature_source import FeatureSource
from pipeline.stores import make_blob_store
from tests.conftest import make_settings

ml_dtypes = pytest.importorskip("ml_dtypes")


@pytest.fixture(scope="module")
def feats(tiny_models) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    shape = TorchBlip(str(tiny_models.blip)).shape
    shape = (shape["patches"], shape["width"])
    return [rng.standard_normal(shape).astype(np.float16) for _ in range(6)]


def test_bf16_keeps_bfloat16_and_scores_it_as_float16(tiny_models, feats) -> None:  # type: ignore[no-untyped-def]
    bf = TorchBlip(str(tiny_models.blip), precision="bf16")
    kept = [bf.stored_form(f) for f in feats]
    assert all(k.dtype == np.dtype(ml_dtypes.bfloat16) for k in kept)
    assert bf.stored_form(kept[0]) is kept[0]  # already in form: no copy
    # float16 -> bfloat16 rounds the same in NumPy and torch: the scores are the same numbers
    want_itm, want_cos = bf.score("a red circle", feats)
    got_itm, got_cos = bf.score("a red circle", kept)
    np.testing.assert_array_equal(got_itm, want_itm)
    np.testing.assert_array_equal(got_cos, want_cos)
    mixed_itm, _ = bf.score("a red circle", kept[:3] + feats[3:])  # some cached in form, some not
    np.testing.assert_array_equal(mixed_itm, want_itm)
    assert np.ptp(want_itm) > 0  # the candidates differ: equal arrays could tell apart a wrong pass


def test_other_precisions_keep_float16(tiny_models, feats) -> None:  # type: ignore[no-untyped-def]
    fp32 = TorchBlip(str(tiny_models.blip))
    assert fp32.stored_form(feats[0]) is feats[0]


def test_the_feature_source_keeps_the_prepared_form(tiny_models, feats, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What comes from the blob store is prepared once, kept in this process so, and handed out so."""
    s = make_settings(tmp_path, tiny_models)
    blobs = make_blob_store(s)
    for i, f in enumerate(feats):
        blobs.put(feature_key("v1", f"p{i}"), featcodec.encode(f))
    bf = TorchBlip(str(tiny_models.blip), precision="bf16")
    local = LocalLRU(1 << 30)
    source = FeatureSource(s, blobs, Breaker("blob_store", 5, 30), local=local, prepare=bf.stored_form)
    ids = [f"p{i}" for i in range(len(feats))]
    counts: dict[str, int] = {}
    first = source.fetch("v1", ids, counts)
    assert counts["features_blob"] == len(feats)
    assert all(first[i].dtype == np.dtype(ml_dtypes.bfloat16) for i in ids)
    again = source.fetch("v1", ids, counts)
    assert counts["features_local"] == len(feats) and all(again[i] is first[i] for i in ids)
    np.testing.assert_array_equal(np.asarray(first["p0"], np.float32), feats[0].astype(np.float32)
                                  .astype(ml_dtypes.bfloat16).astype(np.float32))

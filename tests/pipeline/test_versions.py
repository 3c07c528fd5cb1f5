"""A worker serves a namespace only with the SigLIP that embedded it: another model's vectors are refused, saying
which versions, and the namespace that matches is still served."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from pipeline.search.searcher import Searcher
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.types import SearchParams
from pipeline.versions import ModelVersionMismatch
from tests.conftest import make_settings


@dataclass
class Renamed:
    """The same text tower under another version: what a worker with a changed tokenizer file looks like."""

    inner: Any
    version: str

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.encode_text(texts)  # type: ignore[no-any-return]


def test_other_models_vectors_are_refused_and_the_matching_namespace_served(store_dir, tmp_path, tiny_models,
                                                                             engines) -> None:  # type: ignore[no-untyped-def]
    data = shutil.copytree(store_dir, tmp_path / "data")
    s = make_settings(data, tiny_models, cache_results_ttl_s=0)
    vectors = make_vector_store(s)
    stored = engines.text.version
    # a second namespace embedded by the "new" model: the same vectors, stamped with its version
    hits = vectors.query(engines.text.encode_text(["a red circle"])[0], 48)
    rows = [(m.id, v, {**meta, "model_version": "siglip-new"}) for m in hits
            for v, meta in [vectors.fetch([m.id])[m.id]]]
    vectors.upsert(rows, namespace="new")

    new = Searcher(s, Renamed(engines.text, "siglip-new"), vectors, make_blob_store(s), engines.reranker)
    with pytest.raises(ModelVersionMismatch) as err:
        new.search(SearchParams(query="a red circle", limit=5))
    msg = err.value.message
    assert stored in msg and "siglip-new" in msg and "namespace ''" in msg and "IMGSEARCH_SIGLIP_MODEL" in msg
    assert err.value.code == "model_version_mismatch"
    served = new.search(SearchParams(query="a red circle", limit=5, namespace="new"))
    assert len(served.results) == 5

    old = Searcher(s, engines.text, vectors, make_blob_store(s), engines.reranker)
    assert len(old.search(SearchParams(query="a red circle", limit=5)).results) == 5
    with pytest.raises(ModelVersionMismatch):
        old.search(SearchParams(query="a red circle", limit=5, namespace="new"))


def test_vectors_without_a_version_are_served(tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, tiny_models, cache_results_ttl_s=0)
    vectors = make_vector_store(s)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(8, engines.text.dim)).astype(np.float32)
    vectors.upsert([(f"p{i}", v / np.linalg.norm(v), {"title": f"post {i}"}) for i, v in enumerate(vecs)])
    out = Searcher(s, engines.text, vectors, make_blob_store(s), engines.reranker).search(
        SearchParams(query="a red circle", limit=4))
    assert len(out.candidates) == 8 and len(out.results) == 4

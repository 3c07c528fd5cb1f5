"""pipeline/search/explain.py with the kit's BLIP: a done text job's results get maps (distributions over the patch
grid), image queries say there is no text-to-image map, a job not done is 409, a post not in its results 404,
and an ONNX Runtime/TensorRT reranker is explained by a torch engine of the same checkpoint."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engines.blip import TorchBlip
from engines.kit import KIT_DIR
from engines.kit.world import make_split
from pipeline.errors import Conflict, NotFound
from pipeline.search.explain import NO_TEXT_MAP, explain_posts, overlay_png, torch_engine
from pipeline.types import Job, Result


@pytest.fixture(scope="module")
def kit() -> tuple[TorchBlip, dict[str, Any], list[Image.Image]]:
    engine = TorchBlip(str(KIT_DIR / "blip"))
    images = [it.image(64) for it in make_split(3, held_out=True, seed=5)]
    feats = engine.vision_features(images)
    return engine, {f"p{i}": f for i, f in enumerate(feats)}, images


def _job(status: str = "done", **params: Any) -> Job:
    return Job(id="j1", status=status, query="a large blue cross at the left on a white background", params=params,
               created_at=time.time(), results=[Result(id="p0", score=1.0), Result(id="p1", score=0.5)])


def test_text_job_maps_and_refusals(kit) -> None:  # type: ignore[no-untyped-def]
    engine, feats, _ = kit
    lookup = lambda ids: {i: feats[i] for i in ids if i in feats}  # noqa: E731
    out = explain_posts(_job(), ["p0", "p1"], engine, lookup)
    for m in out.values():
        grid = np.asarray(m["grid"])
        assert grid.shape == (8, 8) and grid.min() >= 0 and abs(grid.sum() - 1) < 1e-3
        assert m["method"] == "gradcam" and m["layer"] == 1
    assert out["p0"]["grid"] != out["p1"]["grid"]
    with pytest.raises(NotFound):
        explain_posts(_job(), ["p2"], engine, lookup)  # indexed, but not in this job's results
    with pytest.raises(Conflict):
        explain_posts(_job("running"), ["p0"], engine, lookup)
    for params in ({"like": "p2"}, {"image": "ab" * 32}):
        assert explain_posts(_job(**params), ["p0"], engine, lookup) == {
            "p0": {"available": False, "reason": NO_TEXT_MAP}}


def test_overlay_keeps_the_image_size(kit) -> None:  # type: ignore[no-untyped-def]
    engine, feats, images = kit
    out = explain_posts(_job(), ["p0"], engine, lambda ids: {i: feats[i] for i in ids})
    raw = io.BytesIO()
    images[0].resize((96, 80)).save(raw, "JPEG")
    png = Image.open(io.BytesIO(overlay_png(raw.getvalue(), out["p0"])))
    assert png.format == "PNG" and png.size == (96, 80)


def test_non_torch_reranker_falls_back_to_torch(kit) -> None:  # type: ignore[no-untyped-def]
    engine = kit[0]
    assert torch_engine(engine) is engine
    ort = SimpleNamespace(backend="onnxruntime", path=engine.path, max_tokens=engine.max_tokens)
    fallback = torch_engine(ort)
    assert fallback.backend == "torch" and fallback.path == engine.path and torch_engine(ort) is fallback

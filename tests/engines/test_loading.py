"""Model loading: local folders work offline; a missing model fails with one clear message."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engines.registry import load_engines
from pipeline.errors import ModelLoadError
from tests.conftest import make_settings


def test_missing_model_names_the_setting(tmp_path, tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_engines(make_settings(tmp_path, tiny_models).model_copy(update={"engines": {"siglip_model": "no-such/model-here"}}))
    assert "IMGSEARCH_SIGLIP_MODEL" in str(err.value) and "no-such/model-here" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_engines(make_settings(tmp_path, tiny_models).model_copy(update={"engines": {"blip_model": str(tmp_path / "empty")}}))


def test_unknown_backend_lists_the_valid_ones(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="valid: auto, onnxruntime, tensorrt, torch"):
        load_engines(make_settings(tmp_path, tiny_models, engine_backend="tensorflow"))


def test_encoders_give_unit_vectors_and_fixed_padding(engines) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    t = engines.text.encode_text(["A red circle!", "a red circle", "something else entirely"])
    assert t.dtype == np.float32 and t.shape == (3, engines.text.dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t[0], t[1], atol=1e-6)  # the original's cleaning: case and punctuation
    assert not np.allclose(t[1], t[2], atol=1e-3)
    i = engines.image.encode_images([Image.new("RGB", (40, 30), "red"), Image.new("L", (10, 10))])
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, rtol=1e-5)


def test_a_workers_engines_are_built_with_one_model_lock(engines) -> None:  # type: ignore[no-untyped-def]
    # the text encoder and the reranker never run at once: each takes the lock the registry built them with
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    from PIL import Image

    assert engines.text.lock is engines.lock and engines.reranker.lock is engines.lock  # type: ignore[attr-defined]
    pool = ThreadPoolExecutor(1)
    engines.lock.acquire()  # as a text encoder's call would
    try:
        call = pool.submit(engines.reranker.vision_features, [Image.new("RGB", (32, 32), "red")])
        with pytest.raises(FutureTimeout):
            call.result(timeout=0.5)  # the reranker waits for it
    finally:
        engines.lock.release()
    assert len(call.result(timeout=60)) == 1  # and runs once it is free
    pool.shutdown()


def test_versions_name_the_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.loading import version_of
    from engines.tiny import make_tiny_models

    a, _ = make_tiny_models(tmp_path / "a", seed=0)
    b, _ = make_tiny_models(tmp_path / "b", seed=1)
    c, _ = make_tiny_models(tmp_path / "c", seed=0)
    assert version_of(a).split("-")[-1] != version_of(b).split("-")[-1]
    assert version_of(a).split("-")[-1] == version_of(c).split("-")[-1]  # deterministic given a seed


def test_the_api_process_loads_no_model() -> None:
    code = "import sys, api.main, workers.tasks; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]

"""Every backend against torch fp32: embeddings, rerank scores and rankings, on the tiny models and on one
full-size random-weight model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engines.blip import TorchBlip
from engines.export import build_onnx
from engines.ort import OrtBlip, OrtSiglip
from engines.siglip import TorchSiglip

pytestmark = pytest.mark.parity
QUERIES = ["a red circle", "a blue square on a white background", "a yellow triangle", "green", "a purple shape"]
# (backend, precision, minimum cosine to torch fp32, ITM/cosine tolerance)
CASES = [("onnxruntime", "fp32", 0.999, 1e-4), ("onnxruntime", "int8", 0.99, 3e-2), ("torch", "bf16", 0.99, 3e-2)]


def assert_same_top10(ref: np.ndarray, other: np.ndarray, exact: bool, tol: float) -> None:
    """fp32 paths rank identically; reduced precision may only swap candidates whose reference scores lie
    within ``tol`` of each other (the tiny models' many near-ties), so its top 10, scored by the reference,
    must equal the reference's top 10 scores within ``tol``."""
    top_ref, top_other = np.argsort(-ref, kind="stable")[:10], np.argsort(-other, kind="stable")[:10]
    if exact:
        assert top_ref.tolist() == top_other.tolist()
    else:
        np.testing.assert_allclose(ref[top_other], ref[top_ref], atol=tol)


@pytest.fixture(scope="module")
def engine_dir(tiny_models, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("engines")
    build_onnx(str(tiny_models.siglip), str(tiny_models.blip), root, precisions=("fp32", "int8"))
    return root


@pytest.fixture(scope="module")
def reference(tiny_models):  # type: ignore[no-untyped-def]
    return TorchSiglip(str(tiny_models.siglip)), TorchBlip(str(tiny_models.blip))


def _make(backend: str, precision: str, tiny_models, engine_dir: Path):  # type: ignore[no-untyped-def]
    if backend == "torch":
        return TorchSiglip(str(tiny_models.siglip), precision=precision), TorchBlip(str(tiny_models.blip), precision=precision)
    return (OrtSiglip(str(tiny_models.siglip), engine_dir, precision=precision),
            OrtBlip(str(tiny_models.blip), engine_dir, precision=precision))


def _images(demo_images: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted(demo_images.glob("*.png"))]


@pytest.mark.parametrize(("backend", "precision", "min_cos", "tol"), CASES, ids=[f"{b}-{p}" for b, p, *_ in CASES])
def test_siglip_parity(backend, precision, min_cos, tol, tiny_models, engine_dir, reference, demo_images) -> None:  # type: ignore[no-untyped-def]
    other, _ = _make(backend, precision, tiny_models, engine_dir)
    assert_siglip_close(reference[0], other, _images(demo_images), min_cos, tol, exact=precision == "fp32")


def assert_siglip_close(ref, other, imgs: list[Image.Image], min_cos: float, tol: float, exact: bool) -> None:  # type: ignore[no-untyped-def]
    t_ref, t_other = ref.encode_text(QUERIES), other.encode_text(QUERIES)
    assert (t_ref * t_other).sum(1).min() >= min_cos
    i_ref, i_other = ref.encode_images(imgs), other.encode_images(imgs)
    assert (i_ref * i_other).sum(1).min() >= min_cos
    # the same top-10 images for every query
    for q_ref, q_other in zip(t_ref, t_other, strict=True):
        assert_same_top10(i_ref @ q_ref, i_other @ q_other, exact, tol)


@pytest.mark.parametrize(("backend", "precision", "min_cos", "tol"), CASES, ids=[f"{b}-{p}" for b, p, *_ in CASES])
def test_blip_parity(backend, precision, min_cos, tol, tiny_models, engine_dir, reference, demo_images) -> None:  # type: ignore[no-untyped-def]
    _, ref = reference
    _, other = _make(backend, precision, tiny_models, engine_dir)
    imgs = _images(demo_images)
    f_ref, f_other = ref.vision_features(imgs), other.vision_features(imgs)
    flat_ref, flat_other = f_ref.reshape(len(imgs), -1).astype(np.float32), f_other.reshape(len(imgs), -1).astype(np.float32)
    cos = (flat_ref * flat_other).sum(1) / np.linalg.norm(flat_ref, axis=1) / np.linalg.norm(flat_other, axis=1)
    assert cos.min() >= min_cos
    for q in QUERIES:
        itm_ref, c_ref = ref.score(q, list(f_ref))
        itm_other, c_other = other.score(q, list(f_ref))  # same stored features: this compares the text side
        np.testing.assert_allclose(itm_other, itm_ref, atol=tol)
        np.testing.assert_allclose(c_other, c_ref, atol=tol)
        assert_same_top10(0.7 * itm_ref + 0.3 * c_ref, 0.7 * itm_other + 0.3 * c_other, precision == "fp32", tol)


@pytest.mark.slow
def test_full_size_siglip_text_parity(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """One full-size random-weight model (the SigLIP 2 base text tower) through ONNX Runtime fp32 and int8."""
    from engines.fullsize import make_fullsize_models

    root = tmp_path_factory.mktemp("full")
    # the real widths and depth; a 32,000-row embedding table (a lookup either way) keeps the export small
    folder = make_fullsize_models(root / "models", which=("siglip",), siglip_vocab=32_000)["siglip"]
    engines = root / "engines"
    build_onnx(str(folder), str(folder), engines, precisions=("fp32", "int8"), components=("siglip_text",))
    ref = TorchSiglip(str(folder))
    texts = QUERIES + ["a surprised pikachu face", "a confused cat looking at a computer", "two dogs", "an old meme"]
    t_ref = ref.encode_text(texts)
    sims_ref = t_ref @ t_ref.T
    for precision, min_cos, tol in (("fp32", 0.999, 0.0), ("int8", 0.99, 2e-3)):
        other = OrtSiglip(str(folder), engines, precision=precision, components=("siglip_text",))
        t_other = other.encode_text(texts)
        assert (t_ref * t_other).sum(1).min() >= min_cos, precision
        # nearest neighbours among the texts themselves are preserved; a random-weight model puts all texts
        # within cosine 0.01 of each other, so int8 may only swap neighbours whose reference scores tie within tol
        for row_ref, row_other in zip(sims_ref, t_other @ t_other.T, strict=True):
            assert_same_top10(row_ref, row_other, precision == "fp32", tol)


@pytest.mark.gpu
def test_tensorrt_parity(tiny_models, engine_dir, reference, demo_images) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorrt")
    from engines.build import build_all
    from engines.trt import TrtBlip, TrtSiglip

    ref_s, ref_b = reference
    build_all(ref_s, ref_b, engine_dir, "fp16")
    s, b = TrtSiglip(str(tiny_models.siglip), engine_dir), TrtBlip(str(tiny_models.blip), engine_dir)
    assert (ref_s.encode_text(QUERIES) * s.encode_text(QUERIES)).sum(1).min() >= 0.99
    feats = ref_b.vision_features(_images(demo_images))
    itm_ref, c_ref = ref_b.score(QUERIES[0], list(feats))
    itm, c = b.score(QUERIES[0], list(feats))
    np.testing.assert_allclose(itm, itm_ref, atol=2e-2)
    np.testing.assert_allclose(c, c_ref, atol=2e-2)


# On a CUDA GPU: torch (fp32, fp16) and ONNX Runtime's CUDA provider against torch fp32 on the CPU.
GPU_CASES = [("torch", "fp32", 0.999, 1e-3), ("torch", "fp16", 0.99, 2e-2), ("onnxruntime", "fp32", 0.999, 1e-3)]


def _make_cuda(backend: str, precision: str, tiny_models, engine_dir: Path):  # type: ignore[no-untyped-def]
    if backend == "torch":
        return (TorchSiglip(str(tiny_models.siglip), precision=precision, device="cuda"),
                TorchBlip(str(tiny_models.blip), precision=precision, device="cuda"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} here has no CUDA execution provider (needs onnxruntime-gpu)")
    s = OrtSiglip(str(tiny_models.siglip), engine_dir, precision=precision, device="cuda")
    assert s.s["siglip_text"]._sess.get_providers()[0] == "CUDAExecutionProvider"
    return s, OrtBlip(str(tiny_models.blip), engine_dir, precision=precision, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "precision", "min_cos", "tol"), GPU_CASES,
                         ids=[f"cuda-{b}-{p}" for b, p, *_ in GPU_CASES])
def test_cuda_parity(backend, precision, min_cos, tol, tiny_models, engine_dir, reference, demo_images) -> None:  # type: ignore[no-untyped-def]
    ref_s, ref_b = reference
    s, b = _make_cuda(backend, precision, tiny_models, engine_dir)
    imgs = _images(demo_images)
    assert_siglip_close(ref_s, s, imgs, min_cos, tol, exact=False)  # GPU kernels differ from the CPU's
    feats = ref_b.vision_features(imgs)
    for q in QUERIES:
        itm_ref, c_ref = ref_b.score(q, list(feats))
        itm, c = b.score(q, list(feats))
        np.testing.assert_allclose(itm, itm_ref, atol=tol)
        np.testing.assert_allclose(c, c_ref, atol=tol)
        assert_same_top10(0.7 * itm_ref + 0.3 * c_ref, 0.7 * itm + 0.3 * c, False, tol)


@pytest.mark.gpu
@pytest.mark.slow
def test_full_size_cuda_fp16_parity(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """The full-size random-weight SigLIP 2 text tower in fp16 on the GPU against fp32 on the CPU."""
    from engines.fullsize import make_fullsize_models

    folder = make_fullsize_models(tmp_path_factory.mktemp("full-gpu"), which=("siglip",))["siglip"]
    texts = QUERIES + ["a surprised pikachu face", "a confused cat looking at a computer", "two dogs"]
    t_ref = TorchSiglip(str(folder)).encode_text(texts)
    t = TorchSiglip(str(folder), precision="fp16", device="cuda").encode_text(texts)
    assert (t_ref * t).sum(1).min() >= 0.99


def _streams_vs_shared(siglip: str, blip: str, engine_dir: str, demo_images: str) -> dict[str, Any]:
    """In a fresh process (ONNX Runtime takes per-session pools only before its first session)."""
    from engines.registry import load_engines, load_image_engines, prepare_ingest_process
    from pipeline.settings import Settings

    s = Settings(engines={"siglip_model": siglip, "blip_model": blip, "backend": "onnxruntime", "dir": Path(engine_dir)},
                 ingest_embed_streams=2)
    prepare_ingest_process(s)
    shared = load_engines(s)
    streams = load_image_engines(s, shared)
    imgs = _images(Path(demo_images))[:4]
    ref_v, ref_f = shared.image.encode_images(imgs), shared.reranker.vision_features(imgs).astype(np.float32)
    return {"n": len(streams), "own_pools": all(not x.shared for img, _ in streams for x in img.s.values()),  # type: ignore[attr-defined]
            "dims": [img.dim for img, _ in streams] + [shared.image.dim],
            "vec_diff": max(float(np.abs(img.encode_images(imgs) - ref_v).max()) for img, _ in streams),
            "feat_diff": max(float(np.abs(r.vision_features(imgs).astype(np.float32) - ref_f).max()) for _, r in streams)}


def test_ingest_embed_streams_on_onnxruntime_match_the_shared_engines(tiny_models, engine_dir, demo_images) -> None:  # type: ignore[no-untyped-def]
    """Ingest's single-threaded replicas (own session pools, image sessions only) give the shared engines' numbers."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        got = pool.submit(_streams_vs_shared, str(tiny_models.siglip), str(tiny_models.blip), str(engine_dir),
                          str(demo_images)).result(timeout=120)
    assert got["n"] == 2 and got["own_pools"] and len(set(got["dims"])) == 1
    assert got["vec_diff"] < 1e-5 and got["feat_diff"] < 2e-3

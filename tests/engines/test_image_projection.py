"""An image query's rerank compares BLIP's ITC image projections: every backend reads ``vision_proj`` from the
checkpoint's safetensors (NumPy), the torch backend from its loaded model; both must be the model's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from engines.blip import BlipBase, TorchBlip
from engines.kit import KIT_DIR
from engines.siglip import l2


def test_image_projection_is_the_models_vision_proj_on_the_cls_row(tmp_path: Path) -> None:
    blip = TorchBlip(str(KIT_DIR / "blip"))
    images = [Image.new("RGB", (64, 64), c) for c in ((220, 40, 40), (40, 80, 220), (20, 20, 20))]
    feats = blip.vision_features(images)
    with torch.inference_mode():
        want = l2(blip.model.vision_proj(torch.from_numpy(feats[:, 0].astype(np.float32))).numpy())
    got_torch = blip.image_projection(list(feats))
    got_file = BlipBase(str(KIT_DIR / "blip")).image_projection(list(feats))  # what ONNX Runtime / TensorRT run
    np.testing.assert_allclose(got_torch, want, atol=1e-5)
    np.testing.assert_allclose(got_file, want, atol=1e-5)
    bin_only = tmp_path / "blip"  # a checkpoint with only pytorch_model.bin (read with torch's weights-only loader)
    shutil.copytree(KIT_DIR / "blip", bin_only, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(load_file(KIT_DIR / "blip" / "model.safetensors"), bin_only / "pytorch_model.bin")
    np.testing.assert_allclose(BlipBase(str(bin_only)).image_projection(list(feats)), want, atol=1e-5)
    assert got_file.shape == (3, want.shape[1]) and np.allclose(np.linalg.norm(got_file, axis=1), 1, atol=1e-5)
    cos = got_file @ got_file.T
    assert cos[0, 1] < 0.999  # different pictures, different projections: the cosine ranks something

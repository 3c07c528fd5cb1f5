"""The model kit: the world generator, a training smoke run (seconds) that the real loading code reads back,
and the committed kit's manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from engines.blip import TorchBlip
from engines.kit import KIT_DIR
from engines.kit.train import KitConfig, train_kit
from engines.kit.world import HELD_OUT, make_split
from engines.siglip import TorchSiglip

SMOKE = KitConfig(n_train=256, siglip_steps=3, blip_steps=2, batch=16, blip_batch=8, hidden=32, layers=1)


def test_world_splits_are_disjoint_and_deterministic() -> None:
    train = make_split(300, held_out=False, seed=0)
    held = make_split(100, held_out=True, seed=0, unique=True)
    assert not any((o.colour, o.shape) in HELD_OUT for it in train for o in it.scene.objects)
    assert all(any((o.colour, o.shape) in HELD_OUT for o in it.scene.objects) for it in held)
    assert len({it.scene.key() for it in held}) == len(held)
    again = make_split(100, held_out=True, seed=0, unique=True)
    assert [it.scene for it in again] == [it.scene for it in held]
    assert np.array_equal(np.asarray(held[3].image(64)), np.asarray(again[3].image(64)))
    assert all(len(set(it.scene.captions())) >= 3 for it in held)  # several phrasings


def test_training_smoke_run_loads_through_the_real_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    manifest = train_kit(tmp_path / "a", SMOKE, progress=lambda _: None, eval_gallery=0)
    assert np.isfinite(manifest["siglip"]["final_loss"]) and np.isfinite(manifest["blip"]["final_itm"])
    s, b = TorchSiglip(str(tmp_path / "a" / "siglip")), TorchBlip(str(tmp_path / "a" / "blip"))
    items = make_split(4, held_out=True, seed=0, unique=True)
    imgs = [it.image(SMOKE.image_size) for it in items]
    v = s.encode_images(imgs)
    assert v.shape == (4, 32) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert s.max_tokens == SMOKE.max_tokens  # padded to the positions the small text tower has
    itm, cos = b.score(items[0].scene.captions()[0], list(b.vision_features(imgs)))
    assert itm.shape == cos.shape == (4,) and ((itm >= 0) & (itm <= 1)).all()
    # deterministic given the seed
    train_kit(tmp_path / "b", SMOKE, progress=lambda _: None, eval_gallery=0)
    for part in ("siglip", "blip"):
        digest = [hashlib.sha256((tmp_path / r / part / "model.safetensors").read_bytes()).hexdigest() for r in "ab"]
        assert digest[0] == digest[1], part


def test_committed_kit_is_small_and_described() -> None:
    manifest = json.loads((KIT_DIR / "manifest.json").read_text())
    assert {"data_version", "config", "siglip", "blip", "metrics"} <= set(manifest)
    size = sum(p.stat().st_size for p in KIT_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"the kit is {size / 2**20:.1f} MB"
    assert manifest["metrics"]["recall"]["rerank fused"]["R@5"] >= 0.9

"""`imgsearch eval` on a person's own folder of captioned images, and the sweep over fusion weights, with the
trained kit (which ranks its world's images well, so a wrong answer key would show)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from engines.blip import TorchBlip
from engines.kit import KIT_DIR
from engines.kit.evaluate import evaluate_gallery, load_manifest
from engines.kit.world import make_split
from engines.siglip import TorchSiglip

N = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out scenes as JPEGs with shuffled names (so a gallery index is not a query index), captions in
    manifest.json for half of them and manifest.csv for the rest, and two uncaptioned distractors."""
    root = tmp_path_factory.mktemp("captioned")
    items = make_split(N + 2, held_out=True, seed=7, unique=True)
    names = [f"img-{i:03d}.jpg" for i in random.Random(0).sample(range(1000), N + 2)]
    for it, name in zip(items, names, strict=True):
        it.image(64).save(root / name)
    half = N // 2
    (root / "manifest.json").write_text(json.dumps(
        [{"file": names[i], "caption": items[i].scene.captions()[0]} for i in range(half)]))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "caption"])
        for i in range(half, N):
            w.writerow([names[i], items[i].scene.captions()[0]])
            w.writerow([names[i], items[i].scene.captions()[1]])  # two captions for one image: two queries
    return root


@pytest.fixture(scope="module")
def kit() -> tuple[TorchSiglip, TorchBlip]:
    return TorchSiglip(str(KIT_DIR / "siglip")), TorchBlip(str(KIT_DIR / "blip"))


def test_manifest_gallery_reports_recall_per_fusion_weight(folder, kit) -> None:  # type: ignore[no-untyped-def]
    gallery = load_manifest(folder)
    assert len(gallery.images) == N + 2 and len(gallery.queries) == N + N // 2
    report = evaluate_gallery(*kit, gallery, weights=(0.5, 0.7, 1.0))
    recall = report["recall"]
    assert list(recall) == ["siglip", "rerank 0.5", "rerank 0.7", "rerank 1", "rerank itm", "rerank cosine"]
    for rec in recall.values():
        assert 0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= 1
    assert recall["rerank 1"] == recall["rerank itm"]  # weight 1: ITM alone
    assert recall["rerank 0.7"]["R@5"] >= 0.8 and recall["siglip"]["R@10"] >= 0.8  # the kit finds its images


def test_a_wrong_answer_key_scores_low(folder, kit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same images with every caption moved to another image: recall collapses, so it measures the key."""
    gallery = load_manifest(folder)
    gallery.answers = [(a + 5) % len(gallery.images) for a in gallery.answers]
    assert evaluate_gallery(*kit, gallery)["recall"]["rerank 0.7"]["R@1"] <= 0.2


def test_cli_sweeps_weights_one_row_each(folder) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cli.main import cli

    out = CliRunner().invoke(cli, ["eval", "--manifest", str(folder), "--weights", "0.5,0.6,0.7,0.8,1.0"])
    assert out.exit_code == 0, out.output
    for w, c in (("0.5", "0.5"), ("0.6", "0.4"), ("0.7", "0.3"), ("0.8", "0.2"), ("1", "0")):
        assert f"{w}*ITM + {c}*cosine |" in out.output
    assert f"{N + 2} images, {N + N // 2} captions" in out.output


def test_bad_manifests_say_what_is_wrong(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no captions"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([{"file": "missing.jpg", "caption": "a cat"}]))
    with pytest.raises(ValueError, match="missing.jpg"):
        load_manifest(tmp_path)

"""The engine key covers the set of graphs a model version needs, each at its revision: a folder that lacks one
(built before it existed, or at an older revision) is refused with the build command and completed by the next
build, which builds only what is missing."""

from __future__ import annotations

import pytest

from engines import artifacts
from engines.artifacts import GRAPHS, EngineMissing, missing_graphs, onnx_path
from engines.blip import BlipBase
from engines.export import build_onnx
from engines.ort import OrtBlip


def test_an_old_folder_is_refused_then_completed_never_half_used(tmp_path, tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    blip = str(tiny_models.blip)
    version = BlipBase(blip).version
    build_onnx(blip, blip, tmp_path, components=tuple(GRAPHS["blip"]))
    assert missing_graphs(tmp_path, version, "blip", "fp32") == []
    built = {g: onnx_path(tmp_path, version, g, "fp32").stat().st_mtime_ns for g in GRAPHS["blip"]}

    # the reassociated graph's export changed: its revision is raised, its file gets a new name
    raised = artifacts.REVISIONS["blip_itm_rx"] + 1
    monkeypatch.setitem(artifacts.REVISIONS, "blip_itm_rx", raised)
    assert onnx_path(tmp_path, version, "blip_itm_rx", "fp32").name == f"blip_itm_rx.r{raised}.fp32.onnx"
    assert missing_graphs(tmp_path, version, "blip", "fp32") == ["blip_itm_rx"]
    with pytest.raises(EngineMissing, match="imgsearch engines build --backend onnxruntime --precision fp32"):
        OrtBlip(blip, tmp_path, precision="fp32")  # refused at load, not at the first query

    build_onnx(blip, blip, tmp_path, components=tuple(GRAPHS["blip"]))  # completes the folder
    assert missing_graphs(tmp_path, version, "blip", "fp32") == []
    for g, mtime in built.items():  # what was there is kept, not rebuilt
        if g != "blip_itm_rx":
            assert onnx_path(tmp_path, version, g, "fp32").stat().st_mtime_ns == mtime
    OrtBlip(blip, tmp_path, precision="fp32")

"""One build sequence for the CLI and the Modal container (engines.build): the ONNX exports the precision needs,
then, for TensorRT, plans from the fp32 exports; what is built is kept; without tensorrt the plans are refused
with what to install, after the exports."""

from __future__ import annotations

import sys

import pytest

from engines.artifacts import BLIP_COMPONENTS, SIGLIP_COMPONENTS, EngineMissing
from engines.build import build_engines, onnx_precisions
from tests.conftest import make_settings


def test_the_precisions_each_engine_is_made_from() -> None:
    assert onnx_precisions("int8") == ("fp32", "int8")
    assert onnx_precisions("fp32") == onnx_precisions("fp16") == ("fp32",)


def test_onnx_exports_kept_then_tensorrt_refused_without_it(tmp_path, tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, tiny_models)
    steps: list[str] = []
    built = build_engines(s, "onnxruntime", "fp32", progress=steps.append)
    graphs = SIGLIP_COMPONENTS + BLIP_COMPONENTS
    assert len(built) == len(graphs) and all(p.is_file() and p.parent.parent == s.engines_path for p in built)
    assert steps == [f"{g} fp32" for g in graphs]
    mtimes = {p: p.stat().st_mtime_ns for p in built}

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as where the gpu extra is not installed
    with pytest.raises(EngineMissing, match=r"pip install 'imgsearch\[gpu\]'"):
        build_engines(s, "tensorrt", "fp16")
    assert {p: p.stat().st_mtime_ns for p in built} == mtimes  # the exports were there: kept, not redone

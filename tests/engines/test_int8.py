"""int8 engines: built with a recipe that is right on every x86 kind, checked against fp32 when they load.

The AVX2 test runs the self-check under qemu-user emulating a Haswell (AVX2, no VNNI): ONNX Runtime picks its
kernels from the CPU's features, so there it runs the U8S8 kernels whose 16-bit sums saturate, whatever the
machine running the tests has."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines.artifacts import INT8_RECIPE, RECIPES, EngineMissing, graph_name, onnx_path
from engines.check import check_model
from engines.export import build_onnx
from engines.ort import OrtBlip, OrtSiglip
from engines.selfcheck import MAX_ITM_DIFF, MIN_COSINE, Int8Disagrees

pytestmark = pytest.mark.parity
OLD = RECIPES["s8"]  # the recipe before this one: full-range int8 weights, one scale per tensor
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """One folder with the fp32 graphs, the probes, and the int8 graphs of the old recipe and the chosen one."""
    root = tmp_path_factory.mktemp("int8")
    for recipe in (OLD, INT8_RECIPE):
        build_onnx(str(tiny_models.siglip), str(tiny_models.blip), root, precisions=("fp32", "int8"), recipe=recipe)
    return root


def _copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "engines"))


def _tamper_scales(graph: Path) -> int:
    """Scale ``graph``'s weight scales by 4 and 1/4 in turn (what a corrupt or mis-built engine looks like: a
    uniform factor could partly cancel in the layer norms)."""
    model = onnx.load(str(graph))
    n = 0
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT:
            factor = np.float32(4.0 if n % 2 == 0 else 0.25)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
            n += 1
    onnx.save(model, str(graph))
    return n


def test_the_chosen_recipe_loads_and_reports_its_agreement(tiny_models, built) -> None:  # type: ignore[no-untyped-def]
    s = OrtSiglip(str(tiny_models.siglip), built, precision="int8", components=("siglip_text",))
    agreement = s.s["siglip_text"].agreement
    assert agreement is not None and agreement.ok and agreement.cosine >= MIN_COSINE
    b = OrtBlip(str(tiny_models.blip), built, precision="int8")
    assert all(b.s[n].agreement is not None and b.s[n].agreement.ok for n in ("blip_itc", "blip_itm_rx", "blip_itm"))
    assert b.s["blip_vision"].agreement is None  # not opened yet: checked before its first run instead


@pytest.mark.parametrize("component", ["siglip_text", "blip_itm_rx"])
def test_tampered_weight_scales_are_refused_at_load(component, tiny_models, built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engines = _copy(built, tmp_path)
    model = tiny_models.siglip if component.startswith("siglip") else tiny_models.blip
    version = next(p.parent.name for p in engines.rglob(f"{graph_name(component)}.fp32.onnx"))
    assert _tamper_scales(onnx_path(engines, version, component, "int8")) > 0
    with pytest.raises(Int8Disagrees) as err:
        if component.startswith("siglip"):
            OrtSiglip(str(model), engines, precision="int8")
        else:
            OrtBlip(str(model), engines, precision="int8")
    line = err.value.message
    assert "\n" not in line and f"{graph_name(component)}.int8-{INT8_RECIPE.name}.onnx" in line and f">= {MIN_COSINE}" in line
    cosine = float(line.split("cosine to fp32 ")[1].split()[0])
    itm = float(line.split("largest ITM difference ")[1].split()[0])
    assert cosine < MIN_COSINE or itm > MAX_ITM_DIFF
    # the CLI's check reports the same figure and fails
    report = check_model(str(model), load=False, engine_dir=engines)
    assert not report.ok
    assert any(c.name == "int8" and c.ok is False and component in c.detail for c in report.checks)


def test_models_check_reports_the_int8_figures(tiny_models, built) -> None:  # type: ignore[no-untyped-def]
    report = check_model(str(tiny_models.siglip), load=False, engine_dir=built)
    rows = [c for c in report.checks if c.name == "int8"]
    assert report.ok and {r.detail.split(":")[0] for r in rows} == {
        f"siglip_text.int8-{INT8_RECIPE.name}.onnx", f"siglip_image.int8-{INT8_RECIPE.name}.onnx"}
    assert all(r.ok and "cosine to fp32 0.99" in r.detail for r in rows)


def test_engines_of_another_recipe_are_never_served(tiny_models, built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engines = _copy(built, tmp_path)
    for old in engines.rglob(f"*.int8-{INT8_RECIPE.name}.onnx"):
        old.unlink()  # what a folder built before this recipe holds: other int8 graphs only
    with pytest.raises(EngineMissing, match="imgsearch engines build"):
        OrtSiglip(str(tiny_models.siglip), engines, precision="int8")
    build_onnx(str(tiny_models.siglip), str(tiny_models.blip), engines, precisions=("fp32", "int8"))
    assert OrtSiglip(str(tiny_models.siglip), engines, precision="int8").s["siglip_text"].agreement is not None


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="qemu-user is not installed (make test installs it)")
def test_int8_is_right_on_an_avx2_cpu_without_vnni(built) -> None:  # type: ignore[no-untyped-def]
    """Under an emulated AVX2-only CPU the old recipe's graphs are refused (the emulation runs the saturating
    kernels, so this test can fail) and the chosen recipe's all agree with fp32."""
    siglip = next(p for p in built.iterdir() if p.name.startswith("siglip"))

    def emulated(recipe: str) -> list[dict]:  # type: ignore[type-arg]
        done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-m", "engines.selfcheck", str(siglip),
                               recipe], capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    old, chosen = emulated(OLD.name), emulated(INT8_RECIPE.name)
    assert len(old) == len(chosen) == 2
    assert any(not r["ok"] for r in old), old
    assert all(r["ok"] for r in chosen), chosen


SATURATION_PROBE = """
import json, numpy as np, onnxruntime as ort
from onnx import TensorProto as T, helper
def product(top):
    a = helper.make_tensor_value_info("a", T.UINT8, [2, 64, 256]); b = helper.make_tensor_value_info("b", T.INT8, [2, 256, 64])
    y = helper.make_tensor_value_info("y", T.INT32, [2, 64, 64])
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", [a, b], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = np.full((2, 64, 256), 255, np.uint8)
    w = rng.choice(np.array([top, top - 1], np.int8), (2, 256, 64))
    return bool(np.array_equal(s.run(None, {"a": x, "b": w})[0], x.astype(np.int64) @ w.astype(np.int64)))
print(json.dumps({"tokens_7bit": product(63), "full_range": product(127)}))
"""


@pytest.mark.slow
def test_the_rerank_image_attention_in_int8_is_right_on_an_avx2_cpu(built) -> None:  # type: ignore[no-untyped-def]
    """The reassociated graph's products with the image tokens (uint8 x int8, tokens 7-bit as the second operand:
    engines/export.py ``_int8_image_attention``) under ``bench.cpumask avx2``, where ONNX Runtime runs the AVX2
    kernel that adds pairs of products in 16 bits: 7-bit second operands give exact sums there and full-range ones
    do not (so the mask does run that kernel, and this test can fail), and BLIP's int8 graphs pass their
    self-check."""
    from bench import cpumask

    blip = next(p for p in built.iterdir() if p.name.startswith("blip"))
    env = {**cpumask.environment("avx2"), "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([sys.executable, "-c", SATURATION_PROBE], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=env)
    if probe.returncode == cpumask.UNSUPPORTED:
        pytest.skip("no CPUID faulting on this host (bench.cpumask)")
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"tokens_7bit": True, "full_range": False}
    done = subprocess.run([sys.executable, "-m", "engines.selfcheck", str(blip), INT8_RECIPE.name], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert any(r["graph"].split("/")[1].startswith("blip_itm_rx") for r in rows), rows
    assert rows and all(r["ok"] for r in rows), rows

"""The torch backend's rerank pass compiled ahead of time for this host (engines/compiled.py): built by the
command, loaded where built (``auto``), required with ``on``, never used from another host; the same numbers as
the eager pass at every shape a worker sends, and the eager pass outside the built range."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engines import auto, compiled
from engines.artifacts import EngineMissing
from engines.blip import TorchBlip
from engines.build import build_engines
from engines.registry import load_engines, preflight
from tests.conftest import make_settings

pytestmark = pytest.mark.skipif(not compiled.has_compiler(),
                                reason="AOTInductor compiles C++ with g++ (or $CXX): none here (make test installs g++)")


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Settings whose engine dir holds the tiny BLIP's compiled fp32 rerank, built by the build command's code."""
    s = make_settings(tmp_path_factory.mktemp("compiled"), tiny_models)
    (path,) = build_engines(s, "torch", "fp32")
    return s, path


@pytest.fixture(scope="module")
def feats(tiny_models) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    shape = TorchBlip(str(tiny_models.blip)).shape
    return [rng.standard_normal((shape["patches"], shape["width"])).astype(np.float16) for _ in range(9)]


def _calls(blip: TorchBlip) -> list[int]:
    """Counts the calls that reach the compiled package."""
    assert blip.compiled is not None
    runner, seen = blip.compiled.runner, []

    def counted(*args):  # type: ignore[no-untyped-def]
        seen.append(args[3].shape[0])
        return runner(*args)

    blip.compiled.runner = counted
    return seen


def test_the_build_names_the_host_and_a_worker_loads_it(built, tiny_models) -> None:  # type: ignore[no-untyped-def]
    s, path = built
    assert path == compiled.package_path(s.engines_path, TorchBlip(str(tiny_models.blip)).version, "fp32")
    assert compiled.is_current(path) and path.stat().st_size < 20e6  # no weights inside: the engine's own
    engines = load_engines(s)
    assert engines.reranker.compiled is not None and engines.describe()["rerank_compiled"] == path.name
    off = load_engines(s.model_copy(update={"engines": {"compiled": "off"}}))
    assert off.reranker.compiled is None and "rerank_compiled" not in off.describe()
    assert build_engines(s, "torch", "fp32")[0].stat().st_mtime == path.stat().st_mtime  # kept, not rebuilt


def test_compiled_scores_equal_the_eager_pass(built, tiny_models, feats) -> None:  # type: ignore[no-untyped-def]
    s, _ = built
    fast = TorchBlip(str(tiny_models.blip), compiled="auto", engine_dir=s.engines_path)
    eager = TorchBlip(str(tiny_models.blip), compiled="off")
    seen = _calls(fast)
    # (the tiny model reassociates queries of up to 9 tokens; a longer one runs the plain pass, compiled or not)
    for query, n in (("a red circle", 9), ("a blue square on white", 3), ("dog", 1)):
        assert fast.reassociates(fast.query_inputs(query)[0].shape[1])
        got, want = fast.score(query, feats[:n]), eager.score(query, feats[:n])
        np.testing.assert_allclose(got[0], want[0], atol=2e-5)
        np.testing.assert_allclose(got[1], want[1], atol=2e-5)
    assert seen == [9, 3, 1]
    assert np.ptp(eager.score("a red circle", feats)[0]) > 0  # the candidates differ: equal arrays could tell
    # several queries of several lengths in one call (the worker's cross-query batching)
    items = [("a red circle", feats[:4]), ("two green triangles", feats[4:]), ("a red circle", feats[2:5]),
             ("a small blue square on a large white field", feats[:2])]
    for (gi, gc), (wi, wc) in zip(fast.score_many(items), eager.score_many(items), strict=True):
        np.testing.assert_allclose(gi, wi, atol=2e-5)
        np.testing.assert_allclose(gc, wc, atol=2e-5)
    assert len(seen) > 3


def test_a_call_outside_the_built_shapes_runs_the_eager_pass(built, tiny_models, feats, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s, _ = built
    fast = TorchBlip(str(tiny_models.blip), engine_dir=s.engines_path)
    eager = TorchBlip(str(tiny_models.blip), compiled="off")
    assert fast.compiled is not None and fast.compiled.fits(1, 8, 32) and not fast.compiled.fits(1, 8, 1025)
    monkeypatch.setitem(fast.compiled.limits, "candidates", 4)  # as if built for at most 4
    seen = _calls(fast)
    np.testing.assert_allclose(fast.score("a red circle", feats)[0], eager.score("a red circle", feats)[0], atol=2e-5)
    assert seen == []  # 9 candidates: over the built range, so eager
    fast.score("a red circle", feats[:4])
    assert seen == [4]


def test_on_requires_the_package_and_names_the_command(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, tiny_models).model_copy(update={"engines": {"compiled": "on"}})
    assert s.engines.compiled == "on"
    for attempt in (lambda: preflight(s), lambda: load_engines(s)):
        with pytest.raises(EngineMissing, match="imgsearch engines build --backend torch --precision fp32"):
            attempt()
    with pytest.raises(ValueError, match="fp32 or bf16"):
        build_engines(s, "torch", "fp16")
    assert load_engines(s.model_copy(update={"engines": {"compiled": "auto"}})).reranker.compiled is None


def test_a_package_from_another_host_is_never_loaded_and_listed_stale(built, tiny_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cli.main import cli
    from pipeline.settings import get_settings

    s, path = built
    other = make_settings(tmp_path, tiny_models)
    version = path.parent.name
    (other.engines_path / version).mkdir(parents=True)
    foreign = other.engines_path / version / path.name.replace(compiled.host_tag(), "0123456789ab")
    shutil.copy(path, foreign)
    assert load_engines(other).reranker.compiled is None
    monkeypatch.setenv("IMGSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("IMGSEARCH_BLIP_MODEL", str(tiny_models.blip))
    monkeypatch.setenv("IMGSEARCH_SIGLIP_MODEL", str(tiny_models.siglip))
    get_settings.cache_clear()  # the command reads this environment, not an earlier test's
    try:
        listed = CliRunner().invoke(cli, ["engines", "list"])
        assert listed.exit_code == 0 and f"stale    {version}/{foreign.name}" in listed.output, listed.output
        shutil.copy(path, other.engines_path / version / path.name)
        listed = CliRunner().invoke(cli, ["engines", "list"])
        assert f"current  {version}/{path.name}" in listed.output
    finally:
        get_settings.cache_clear()


def test_auto_times_again_once_a_package_is_built(tmp_path, tiny_models, built, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A cached choice stands until a compiled rerank appears for this host: then torch's candidates run another
    pass, and the next start measures again (and says so)."""
    s = make_settings(tmp_path, tiny_models, engine_backend="auto", engine_precision="auto")
    monkeypatch.setattr(auto, "cpu", lambda: ("an AVX2-only CPU", {"avx2", "fma"}))
    load_engines(s)
    assert auto.cached(s) is not None
    _, path = built
    package = compiled.package_path(s.engines_path, path.parent.name, "fp32")
    package.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, package)  # as if built here (the patched CPU names another host tag), with its record
    shutil.copy(path.with_suffix(".json"), package.with_suffix(".json"))
    assert auto.cached(s) is None
    again = load_engines(s)
    assert again.reranker.compiled is not None and "compiled for this host in fp32" in again.describe()["auto"]


def test_a_build_whose_check_fails_is_never_kept(built, tiny_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A package is checked against the eager pass before it is kept, and its record says how close it came; one
    that fails the check is never written (the compile step hands back the fixture's real package, so the check
    runs real numbers until it is made to fail)."""
    import json

    import torch

    _, path = built
    record = json.loads(path.with_suffix(".json").read_text())
    assert 0 <= record["max_diff"] <= compiled.TOLERANCE["fp32"] and record["build_s"] > 0
    assert record["limits"] == {"queries": compiled.MAX_QUERIES, "tokens": 35, "candidates": compiled.MAX_CANDIDATES}
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path, inductor_configs: shutil.copy(path, package_path))
    blip = TorchBlip(str(tiny_models.blip), compiled="off")
    checked = []
    real = compiled.self_check
    monkeypatch.setattr(compiled, "self_check", lambda c, b: checked.append(real(c, b)) or checked[-1])
    kept = compiled.build(blip, tmp_path / "engines")
    assert kept.is_file() and checked and checked[0] <= compiled.TOLERANCE["fp32"]
    monkeypatch.setattr(compiled, "self_check", lambda c, b: real(c, b) + 0.5)  # as a miscompiled package would
    with pytest.raises(RuntimeError, match="away from the eager pass"):
        compiled.build(blip, tmp_path / "again")
    assert not [p for p in (tmp_path / "again").rglob("*") if p.is_file()]


def test_a_package_from_an_earlier_build_is_compiled_again(built, tiny_models, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A package whose record names another build revision (or none) still serves, and the next build replaces it;
    one from this revision is kept (the compile step is made to say whether it ran)."""
    import json

    import torch

    _, path = built
    blip = TorchBlip(str(tiny_models.blip), compiled="off")
    here = compiled.package_path(tmp_path / "engines", blip.version, "fp32")
    here.parent.mkdir(parents=True)
    shutil.copy(path, here)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["revision"] == compiled.REVISION

    def compiling(program, package_path, inductor_configs):  # type: ignore[no-untyped-def]
        raise RuntimeError("compiling")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compiling)
    here.with_suffix(".json").write_text(json.dumps(record))
    assert compiled.build(blip, tmp_path / "engines") == here  # this revision's: kept
    for older in ({**record, "revision": compiled.REVISION - 1}, {k: v for k, v in record.items() if k != "revision"}):
        here.with_suffix(".json").write_text(json.dumps(older))
        assert compiled.load(blip, tmp_path / "engines", "on") is not None  # it still serves meanwhile
        with pytest.raises(RuntimeError, match="compiling"):
            compiled.build(blip, tmp_path / "engines")


def test_the_image_attention_probabilities_stay_contiguous_when_compiled() -> None:
    """Inductor took ``contiguous()`` before the second image-attention product as a hint and wrote the
    probabilities with the image tokens' stride 1 row apart (a slower product); ``crossattn._contiguous`` holds
    the layout. Read from the code Inductor writes for the two products and the softmax between them."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from engines.crossattn import _contiguous

    def attend(x: torch.Tensor, qk: torch.Tensor, hold: bool) -> torch.Tensor:
        probs = torch.softmax(torch.bmm(x, qk.transpose(1, 2)), dim=1).transpose(1, 2)  # B x HR x P
        return torch.bmm(_contiguous(probs) if hold else probs.contiguous(), x)

    x, qk = torch.randn(2, 37, 16), torch.randn(2, 6, 16)
    layouts = {}
    for hold in (True, False):
        torch._dynamo.reset()
        out, (code, *_) = run_and_get_code(torch.compile(attend, dynamic=False), x, qk, hold)
        assert torch.allclose(out, attend(x, qk, hold), atol=1e-5)
        layouts[hold] = "(2, 6, 37), (222, 37, 1)" in code  # B x HR x P, the tokens contiguous
    assert layouts == {True: True, False: False}, layouts


def _bench(built, tmp_path: Path, *argv: str) -> list[str]:  # type: ignore[no-untyped-def]
    """``python -m <argv> --build B`` with the fixture's package already in B's engines (the tiny models a
    benchmark writes are the fixture's, seed for seed: the same model version); its output's lines."""
    import subprocess
    import sys

    _, path = built
    root = Path(__file__).resolve().parents[2]
    into = tmp_path / "build" / "engines" / path.parent.name
    into.mkdir(parents=True)
    for f in (path, path.with_suffix(".json")):
        shutil.copy(f, into / f.name)
    done = subprocess.run([sys.executable, "-m", *argv, "--build", str(tmp_path / "build")],
                          cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout.strip().splitlines()


def test_the_rerank_bench_times_the_compiled_pass(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``python -m bench.rerank --quick --compiled --precision fp32`` ends with the compiled pass's speedup."""
    import json

    *_, report, last = _bench(built, tmp_path, "bench.rerank", "--quick", "--compiled", "--precision", "fp32")
    rep = json.loads(report)
    assert rep["compiled_package"] == built[1].name and rep["compiled_itm_max_diff"] < 1e-4
    assert last == f"rerank_speedup={rep['compiled_speedup']:.2f}" and rep["compiled_ms"] > 0


def test_the_profile_takes_the_compiled_pass_apart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``python -m bench.engines --quick --profile --profile-pass compiled --precision fp32``: the pass as Inductor
    compiles it, its products by group and its fused kernels by what each fuses (no eager GELU or LayerNorm)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "bench.engines", "--quick", "--profile", "--profile-pass", "compiled",
                           "--precision", "fp32", "--build", str(tmp_path / "build")],
                          cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    rep = json.loads(done.stdout.strip().splitlines()[-1])
    groups = {r["group"]: r for r in rep["rows"]}
    assert rep["models"].endswith("compiled by Inductor"), rep["models"]
    assert {"image attention", "weight products"} <= set(groups), sorted(groups)
    fused = [g for g in groups if g.startswith("compiled: ")]
    assert any("softmax" in g for g in fused) and any("layer_norm" in g for g in fused), sorted(groups)
    assert not {"gelu", "native_layer_norm", "_softmax"} & set(groups), sorted(groups)
    assert 0 < rep["compute_floor_ms"] < rep["wall_ms"], rep


def test_a_package_serves_only_the_shapes_it_was_built_for(built, tiny_models, feats) -> None:  # type: ignore[no-untyped-def]
    """Its token limit is the build's, not the loading worker's: a worker allowed longer queries sends those to
    the eager pass."""
    s, path = built
    wide = TorchBlip(str(tiny_models.blip), max_tokens=64, engine_dir=s.engines_path)
    assert wide.compiled is not None and wide.compiled.fits(1, 35, 4) and not wide.compiled.fits(1, 36, 4)


def test_an_unusable_package_serves_eager_under_auto_and_stops_a_worker_with_on(built, tiny_models, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    _, path = built
    into = tmp_path / "engines" / path.parent.name
    into.mkdir(parents=True)
    (into / path.name).write_bytes(b"not a package")
    (into / path.with_suffix(".json").name).write_text(path.with_suffix(".json").read_text())
    with caplog.at_level(logging.WARNING, logger="engines.compiled"):
        assert TorchBlip(str(tiny_models.blip), engine_dir=tmp_path / "engines").compiled is None
    assert "cannot be used" in caplog.text and "--force" in caplog.text
    with pytest.raises(EngineMissing, match="cannot be used"):
        TorchBlip(str(tiny_models.blip), compiled="on", engine_dir=tmp_path / "engines")

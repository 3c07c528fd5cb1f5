"""`auto` (the default): the candidates each kind of machine gets, the timed choice cached per host and model
version, and an explicit setting always winning."""

from __future__ import annotations

import logging

import pytest

from engines import auto
from engines.export import build_onnx
from engines.registry import load_engines
from tests.conftest import make_settings


def _auto(tmp_path, tiny_models, **kw):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, tiny_models, engine_backend="auto", engine_precision="auto", **kw)


@pytest.mark.parametrize(("flags", "want"), [
    ({"avx512f", "avx512_bf16", "avx512_vnni"}, [("torch", "bf16"), ("torch", "fp32")]),  # Zen 4
    ({"amx_bf16", "amx_int8", "avx512_vnni"}, [("torch", "bf16"), ("torch", "fp32")]),  # Sapphire Rapids
    # VNNI, but no ONNX Runtime int8 engines built (said so): torch's int8, which needs no build, against fp32
    ({"avx2", "avx512_vnni"}, [("torch", "int8"), ("torch", "fp32")]),
    # without avx512_vnni torch's int8 products run a reference loop (intmm.fast): fp32 alone, untimed
    ({"avx2"}, [("torch", "fp32")]),
    ({"avx2", "avx_vnni"}, [("torch", "fp32")]),
])
def test_the_cpu_features_name_the_candidates(flags, want, tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    pairs, why = auto.candidates(_auto(tmp_path, tiny_models), flags)
    assert pairs == want
    if "avx2" in flags:  # no engines built: the reason says how to build them
        assert "imgsearch engines build --backend onnxruntime --precision int8" in why
    assert ("no torch int8" in why) == (want == [("torch", "fp32")])


def test_without_bf16_onnxruntime_is_timed_where_it_is_built(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """Without bf16 (VNNI, or AVX2 alone): ONNX Runtime int8 and fp32 against torch fp32, each only once its
    engines are built (fp32 alone built: int8 is not timed, and the reason says how to build it); an explicit
    onnxruntime backend runs int8 where it is built."""
    s = _auto(tmp_path, tiny_models)
    assert auto.onnx_precisions_needed({"avx512_vnni"}) == auto.onnx_precisions_needed({"avx2"}) == ("int8", "fp32")
    assert not auto.onnx_precisions_needed({"amx_bf16"})
    build_onnx(s.engines.siglip_model, s.engines.blip_model, s.engines_path, precisions=("fp32",))
    for flags in ({"avx2"}, {"avx2", "avx512_vnni"}):
        pairs, why = auto.candidates(s, flags)
        assert pairs == [("onnxruntime", "fp32")] + [("torch", "int8")] * ("avx512_vnni" in flags) + [("torch", "fp32")]
        assert "--precision int8" in why
    assert auto.precision_for("onnxruntime", s, {"avx2"}) == "fp32"
    build_onnx(s.engines.siglip_model, s.engines.blip_model, s.engines_path, precisions=("fp32", "int8"))
    for flags in ({"avx2"}, {"avx2", "avx512_vnni"}):
        pairs, why = auto.candidates(s, flags)
        assert pairs == [("onnxruntime", "int8"), ("onnxruntime", "fp32")] \
            + [("torch", "int8")] * ("avx512_vnni" in flags) + [("torch", "fp32")]
        assert "build" not in why
    assert auto.precision_for("onnxruntime", s, {"avx2"}) == "int8"
    assert auto.candidates(s, {"avx512_bf16"})[0] == [("torch", "bf16"), ("torch", "fp32")]  # bf16: torch alone


def test_torch_runs_bf16_only_where_the_cpu_has_it(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """The precision the benchmarks and an explicit torch backend default to: bf16 only where native (without it
    torch's bf16 products are hundreds of times slower than fp32); int8 only where set or timed by ``auto`` (an
    explicit torch backend may run a compiled fp32 rerank, which int8 has not)."""
    assert auto.torch_cpu_precision({"avx2", "fma"}) == auto.torch_cpu_precision({"avx512_vnni"}) == "fp32"
    assert auto.torch_cpu_precision({"avx512_bf16"}) == auto.torch_cpu_precision({"amx_bf16"}) == "bf16"
    s = _auto(tmp_path, tiny_models)
    assert auto.precision_for("torch", s, {"avx2", "avx512_vnni"}) == auto.precision_for("torch", s, {"avx2"}) == "fp32"
    assert auto.precision_for("torch", s, {"amx_bf16", "amx_int8", "avx512_vnni"}) == "bf16"


@pytest.mark.parametrize(("cap", "left"), [
    ("", {"amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni"}),
    ("AVX512_CORE_VNNI", {"avx512_vnni"}), ("avx2", set()), ("AVX512_CORE_BF16", {"avx512_bf16", "avx512_vnni"})])
def test_a_onednn_cap_takes_away_the_flags_it_forbids(cap, left, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch's bf16 and int8 products run in oneDNN: capped below an ISA (``ONEDNN_MAX_CPU_ISA``), its flags are
    not native any more, so ``auto`` does not count them (an AMX Xeon capped at VNNI is timed as a VNNI CPU), and
    a choice cached under another cap (or none) is not reused (the cap is in its stamp)."""
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: an AMX Xeon\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n")
    real = auto.Path
    monkeypatch.setattr(auto, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    model, flags = auto.cpu()
    assert model == "an AMX Xeon" and flags & {"amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni"} == left
    assert auto._stamp().get("onednn_cap") == (cap.upper() or None)


def test_engines_built_after_a_choice_are_timed_at_the_next_start(tmp_path, tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An AVX2-only CPU: torch fp32 alone (no torch int8 there), untimed and cached; once ONNX Runtime fp32 is built
    the cached choice no longer stands (its candidates differ), and the next start times both."""
    monkeypatch.setattr(auto, "cpu", lambda: ("an AVX2-only CPU", {"avx2", "fma"}))
    s = _auto(tmp_path, tiny_models)
    first = load_engines(s)
    assert (first.backend, first.precision) == ("torch", "fp32") and not first.describe().get("auto_measured_ms")
    assert auto.cached(s) is not None
    build_onnx(s.engines.siglip_model, s.engines.blip_model, s.engines_path, precisions=("fp32",))
    assert auto.cached(s) is None
    again = load_engines(s)
    assert set(again.describe()["auto_measured_ms"]) == {"onnxruntime fp32", "torch fp32"}
    assert auto.cached(s) is not None and not again.describe()["auto"].endswith("(cached)")


def test_cuda_gets_torch_fp16_without_tensorrt_plans(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    pairs, why = auto.candidates(_auto(tmp_path, tiny_models, device="cuda"))
    assert pairs == [("torch", "fp16")] and "TensorRT" in why


def test_auto_times_chooses_logs_and_caches_per_host_and_version(tmp_path, tiny_models, caplog) -> None:  # type: ignore[no-untyped-def]
    s = _auto(tmp_path, tiny_models)
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        first = load_engines(s)
    pairs, _ = auto.candidates(s)
    assert (first.backend, first.precision) in pairs
    assert first.describe()["auto"] and "auto chose" in caplog.text
    if len(pairs) > 1:  # timed: every candidate's figure is in the reason
        assert set(first.describe()["auto_measured_ms"]) == {f"{b} {p}" for b, p in pairs}
    path = auto.cache_path(s)
    assert path.is_file()
    again = load_engines(s)
    assert (again.backend, again.precision) == (first.backend, first.precision)
    assert again.describe()["auto"].endswith("(cached)")
    assert auto.cache_path(s.model_copy(update={"host_name": "another-host"})) != path  # another host measures anew


def test_an_explicit_setting_always_wins(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    e = load_engines(make_settings(tmp_path, tiny_models, engine_backend="torch", engine_precision="fp32"))
    assert (e.backend, e.precision) == ("torch", "fp32") and "auto" not in e.describe()
    assert not (tmp_path / "engines" / "auto").exists()  # nothing timed, nothing cached
    on_torch = make_settings(tmp_path, tiny_models, engine_backend="torch", engine_precision="auto")
    e = load_engines(on_torch)
    assert (e.backend, e.precision) == ("torch", auto.precision_for("torch", on_torch))
    assert "torch set" in e.describe()["auto"]
    assert auto.describe_host(make_settings(tmp_path, tiny_models)) == "engines: torch fp32 (set explicitly)"

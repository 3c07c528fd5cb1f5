"""``bench.cpumask``: a process under it sees the lesser CPU it names, in every library that asks cpuid, and the
product's own reading of the CPU agrees; under ``avx2`` torch int8 is off oneDNN (as on a real AVX2-only CPU),
still exact, and ``auto`` leaves it out. Its ``--quick`` mode is this test's probe (the benchmarks' quick modes are
in test_benches.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import cpumask
from tests.conftest import Models

pytestmark = [pytest.mark.bench]
ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.cpumask", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """``--quick``'s report, once for the module."""
    done = _run(["--quick"])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _skip_unless_supported(report: dict[str, Any]) -> None:
    if not report["avx2"]["supported"]:
        pytest.skip("no CPUID faulting on this host (bench/cpumask.c needs arch_prctl ARCH_SET_CPUID)")


def test_a_masked_process_sees_the_lesser_cpu(report: dict[str, Any]) -> None:
    _skip_unless_supported(report)
    avx2, vnni, host = report["avx2"], report["vnni"], report["host"]
    assert avx2["aten"] == "AVX2" and avx2["cpuinfo"] == []
    assert not avx2["int8_on_onednn"] and avx2["int_mm_exact"]
    assert not {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"} & set(avx2["product_flags"])
    if "avx512_vnni" in host["cpuinfo"]:  # a mask only takes features away
        assert vnni["cpuinfo"] == ["avx512_f", "avx512_vnni"] and vnni["int8_on_onednn"]
        assert not {"avx512_bf16", "amx_bf16", "amx_int8"} & set(vnni["product_flags"])


def test_a_command_runs_under_the_mask_and_auto_leaves_torch_int8_out(report: dict[str, Any], tmp_path: Path,
                                                                       tiny_models: Models) -> None:
    _skip_unless_supported(report)
    code = ("import json, sys; from pathlib import Path; from engines import auto; "
            "from tests.conftest import Models, make_settings; "
            "s = make_settings(Path(sys.argv[1]), Models(Path(sys.argv[2]), Path(sys.argv[3])), "
            "engine_backend='auto', engine_precision='auto'); print(json.dumps(auto.candidates(s)))")
    done = _run(["avx2", "--", sys.executable, "-c", code, str(tmp_path), str(tiny_models.siglip),
                 str(tiny_models.blip)])
    assert done.returncode == 0, done.stderr[-2000:]
    pairs, why = json.loads(done.stdout.strip().splitlines()[-1])
    assert pairs == [["torch", "fp32"]] and "no torch int8" in why


def test_the_library_is_rebuilt_when_its_source_changes(tmp_path: Path) -> None:
    out = cpumask.build(tmp_path / "mask.so")
    first = out.stat().st_mtime_ns
    assert cpumask.build(out).stat().st_mtime_ns == first  # up to date: kept
    os.utime(out, ns=(first, cpumask.SOURCE.stat().st_mtime_ns - 10**9))
    assert cpumask.build(out).stat().st_mtime_ns > cpumask.SOURCE.stat().st_mtime_ns - 10**9

"""Every benchmark's ``--quick`` mode runs on a fresh checkout and ends with a line that parses: its headline
figure (``name=<number>``) or its report as one line of JSON. Each runs as a user runs it, in its own process,
with a build folder of its own (nothing prepared beforehand), and must end within a minute here.

(``bench.int8 --quick`` has its own test, tests/bench/test_bench_int8.py, and ``bench.cpumask --quick`` its own,
tests/bench/test_cpumask.py; ``bench.baseline`` is the server ``bench.load`` measures against, not a benchmark.
A key ``name:variant`` runs ``bench.name`` with the variant's arguments.)"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 120  # "under a minute" on a quiet machine (bench.load, the longest, took 68 s at load 4 on 2 cores)


def _figure(name: str) -> Any:
    def parse(line: str) -> float:
        m = re.fullmatch(rf"{name}=([0-9.]+|nan)", line)
        assert m, line
        return float(m.group(1))
    return parse


def _json(line: str) -> Any:
    return json.loads(line)


def _pairs(line: str) -> dict[str, str]:
    """``name=value`` pairs, space-separated (``worst_accepted=png-rgba cpu_s=0.18 peak_mib=60.1``)."""
    pairs = dict(token.split("=", 1) for token in line.split())
    assert pairs and all(pairs.values()), line
    return pairs


BENCHES = {
    "engines": (["--build", "{tmp}/build"], _figure("rerank_speedup_8tok")),
    "load": (["--compare-old-default"], _figure("throughput_ratio")),
    "latency": ([], _json),
    "ingest": (["--build", "{tmp}/build"], _json),
    "memory": (["--build", "{tmp}/build"], _json),
    "stores": ([], _json),
    "admission": ([], _figure("jobs_per_s_ratio")),
    "health": ([], _pairs),
    "explain": ([], _json),
    "query_decode": ([], _pairs),
    "slow_hosts": ([], _pairs),
    "rerank": (["--build", "{tmp}/build"], _figure("rerank_speedup")),
    "rerank:onnxruntime": (["--build", "{tmp}/build", "--backend", "onnxruntime", "--profile"],
                           _figure("rerank_speedup")),
    "int8_attention": ([], _json),
}


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_quick_mode_runs_and_its_last_line_parses(name: str, tmp_path: Path) -> None:
    if name == "admission" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    extra, parse = BENCHES[name]
    argv = [sys.executable, "-m", f"bench.{name.split(':')[0]}", "--quick", *(a.format(tmp=tmp_path) for a in extra)]
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S * 3,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.monotonic() - t0
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    value = parse(lines[-1])
    if name == "load":  # the default against torch fp32 at each level (issue 26's figures), from the report
        report = json.loads(done.stdout[done.stdout.index("\n{\n") + 1:done.stdout.rindex("\n}\n") + 2])
        assert {"c1", "c4"} <= set(report["against_old_default"]), report
        assert all(v["qps_ratio"] > 0 and v["p50_share"] > 0 for v in report["against_old_default"].values())
    if name == "rerank:onnxruntime":  # ONNX Runtime's profile of the int8 graph: its image products' own roundings
        report = json.loads(lines[-2])
        assert report["backend"] == "onnxruntime" and report["itm_max_diff"] < 0.05, report
        assert sum(report["ort_profile_ms"].values()) > 0 and "QuantizeLinear" in report["ort_profile_ms"], report
    if isinstance(value, float):
        assert value > 0 or math.isnan(value), lines[-1]
    assert took < LIMIT_S, f"bench.{name} --quick took {took:.0f} s"


@pytest.mark.parametrize("precision", [None, "int8"])
def test_the_rerank_profile_runs_quick_and_states_its_floors(tmp_path: Path, precision: str | None) -> None:
    """``bench.engines --profile`` (a mode of bench.engines, so not in BENCHES): the tiny model's pass, its groups,
    and the compute floor, which is the product groups' FLOPs at the large-matmul rate and so below the call; in
    torch int8 the integer products in groups of their own, at ``_int_mm``'s rate."""
    argv = [sys.executable, "-m", "bench.engines", "--quick", "--profile", "--build", str(tmp_path / "build")]
    argv += ["--precision", precision] if precision else []
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S * 3,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert time.monotonic() - t0 < LIMIT_S
    rep = json.loads(done.stdout.strip().splitlines()[-1])
    groups = {r["group"]: r for r in rep["rows"]}
    products = sum(r.get("gflop", 0.0) for r in rep["rows"])
    assert rep["product_gflop"] == pytest.approx(products, abs=0.01)
    assert 0 < rep["compute_floor_ms"] < rep["wall_ms"], rep
    integer = 0.0
    if precision == "int8":
        assert {"image attention (int8)", "weight products (int8)"} <= set(groups), sorted(groups)
        integer = sum(r.get("gflop", 0.0) for g, r in groups.items() if g.endswith("(int8)"))
        assert rep["int8_product_gflop"] == pytest.approx(integer, abs=0.01) and integer > 0
        floor = integer / rep["int8_matmul_2048_gops"] * 1000
    else:
        assert {"image attention", "weight products"} <= set(groups), sorted(groups)
        floor = 0.0
    floor += (rep["product_gflop"] - integer) / rep["matmul_2048_gflops"] * 1000
    assert rep["compute_floor_ms"] == pytest.approx(floor, rel=0.05, abs=0.01)


def test_the_int8_rerank_runs_quick(tmp_path: Path) -> None:
    """``bench.rerank --precision int8`` (the README's figure for CPUs without bf16): torch int8 against main's
    fp32 pass, its ITM within the quality tests' bound of it."""
    argv = [sys.executable, "-m", "bench.rerank", "--quick", "--precision", "int8", "--build", str(tmp_path / "build")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S * 3,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-2])
    assert report["precision"] == "int8" and report["speedup"] > 0 and report["itm_max_diff"] < 0.05, report
    assert _figure("rerank_speedup")(lines[-1]) > 0

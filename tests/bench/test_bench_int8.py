"""`python -m bench.int8 --quick` runs on a fresh checkout, and its report says what the recipe choice rests on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engines.artifacts import INT8_RECIPE

pytestmark = [pytest.mark.bench, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_bench_int8_quick(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-m", "bench.int8", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["chosen"] == INT8_RECIPE.name and set(report["recipes"]) == {"s8", INT8_RECIPE.name}
    assert set(report["kernels"]) == {"fp32", "u8u8", "u8s8"} and min(report["kernels"].values()) > 0
    chosen = report["recipes"][INT8_RECIPE.name]
    assert chosen["kit_text_cos_min"] >= 0.99 and chosen["kit_top10_agreement"] >= 0.9
    assert chosen["probe_native_refused"] == []
    if shutil.which("qemu-x86_64"):  # the chosen recipe is right on the emulated AVX2 CPU too
        assert chosen["probe_haswell_refused"] == [] and chosen["probe_haswell_cos_min"] >= 0.99

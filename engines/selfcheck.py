"""The int8 self-check: a graph that loads is not a graph that is right on this CPU.

ONNX Runtime's int8 kernels differ by CPU. On x86 without VNNI (AVX2 only, e.g. AMD EPYC before Zen 4) the
U8S8 kernel adds pairs of uint8 x int8 products in 16 bits (``vpmaddubsw``), which saturate for full-range
weights: the same graph that is right on a VNNI CPU bends the vectors there (cosine 0.89 to fp32 measured on
the tiny text tower), and nothing fails. So every int8 graph carries a probe, written when it is built: fixed
inputs (texts and pictures through the model's own preprocessing) and the fp32 graph's outputs on them. Before
an int8 graph's first run, ``verify`` runs the probe through it and compares with those outputs; a graph that
disagrees beyond the bounds below is refused with one line (``Int8Disagrees``). torch int8 (``engines/intmm.py``)
is held to the same bounds at load, against the float pass on the same probe (``compare``, ``refuse_unless_ok``).

The fp32 side is the fp32 graph's output, computed once at build time (fp32 kernels agree across CPUs to about
1e-6), so the check costs one small int8 run per graph and no fp32 session at warm-up.

This module needs only NumPy and ONNX Runtime, so ``python -m engines.selfcheck FOLDER`` can run under an
emulated CPU (``qemu-x86_64 -cpu Haswell``: AVX2, no VNNI), as ``tests/engines/test_int8.py`` does.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import ModelLoadError

# The bounds are the parity tests' (tests/engines/test_parity.py): what int8 must hold against fp32 to rank as
# fp32 does. Measured on the probes (bench.int8): a right graph gives cosine >= 0.998 and ITM within 0.01; the
# saturating kernels gave cosine 0.89 on the tiny text tower and ITM off by 0.07.
MIN_COSINE = 0.99
MAX_ITM_DIFF = 0.03
SCORE_OUTPUTS = ("itm",)  # probabilities: compared by their largest difference; every other output by cosine

Run = Callable[..., list[NDArray[Any]]]


class Int8Disagrees(ModelLoadError):
    code = "int8_disagrees"


def probe_path(graph: Path) -> Path:
    """``blip_itc.int8-s8-rr.onnx`` -> ``blip_itc.probe.npz`` (one probe per graph and revision, whatever the
    recipe: ``blip_itc.r2.int8-s8-rr.onnx`` -> ``blip_itc.r2.probe.npz``)."""
    return graph.with_name(f"{graph.name.rsplit('.', 2)[0]}.probe.npz")


def write_probe(path: Path, inputs: dict[str, NDArray[Any]], outputs: dict[str, NDArray[Any]]) -> None:
    """Keep a probe beside the graphs: inputs under ``in.NAME``, the fp32 graph's outputs under ``out.NAME``."""
    arrays = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{k}": v for k, v in outputs.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


@dataclass(frozen=True)
class Agreement:
    graph: str
    cosine: float  # the smallest, over every row of every vector output
    itm_diff: float  # the largest ITM difference (0 where the graph has no ITM output)
    ms: float  # the probe's run

    @property
    def ok(self) -> bool:
        return self.cosine >= MIN_COSINE and self.itm_diff <= MAX_ITM_DIFF

    def line(self) -> str:
        return (f"int8 self-check of {self.graph}: cosine to fp32 {self.cosine:.4f} (bound >= {MIN_COSINE}), "
                f"largest ITM difference {self.itm_diff:.4f} (bound <= {MAX_ITM_DIFF})")


def _cosines(a: NDArray[Any], b: NDArray[Any]) -> NDArray[np.float64]:
    a, b = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (a, b))
    # no fixed epsilon: a random-weight model's outputs may be tiny (norms of 1e-7) and still be right
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, np.finfo(np.float64).tiny)  # type: ignore[no-any-return]


def measure(graph: Path, run: Run, output_names: list[str]) -> Agreement:
    """Run ``graph``'s probe through ``run`` (an ONNX Runtime session's ``run``-like callable taking the inputs by
    name) and compare each output with the fp32 one kept in the probe."""
    path = probe_path(graph)
    if not path.is_file():
        raise Int8Disagrees(f"the int8 graph {graph.name} has no probe ({path.name}) to check it with; rebuild it with "
                            f"`imgsearch engines build --backend onnxruntime --precision int8 --force`")
    with np.load(path) as z:  # as stored (float16 features): ``run`` converts them to what the graph declares
        inputs = {k[3:]: z[k] for k in z.files if k.startswith("in.")}
        expected = {k[4:]: z[k] for k in z.files if k.startswith("out.")}
    t0 = time.perf_counter()
    got = dict(zip(output_names, run(**inputs), strict=True))
    ms = (time.perf_counter() - t0) * 1000
    return compare(f"{graph.parent.name}/{graph.name}", got, expected, ms)


def compare(graph: str, got: dict[str, Any], expected: dict[str, Any], ms: float = 0.0) -> Agreement:
    """Each of ``expected``'s outputs (fp32) against ``got``'s (int8): ITM by its largest difference, every other
    output by its rows' smallest cosine."""
    cosine, itm = 1.0, 0.0
    for name, want in expected.items():
        if name in SCORE_OUTPUTS:
            itm = max(itm, float(np.abs(np.asarray(got[name], np.float64) - np.asarray(want, np.float64)).max()))
        else:
            cosine = min(cosine, float(_cosines(got[name], want).min()))
    return Agreement(graph, cosine, itm, ms)


def verify(graph: Path, run: Run, output_names: list[str]) -> Agreement:
    """``measure``, refusing a graph outside the bounds with one line."""
    return refuse_unless_ok(measure(graph, run, output_names))


def refuse_unless_ok(agreement: Agreement) -> Agreement:
    """``agreement``, or ``Int8Disagrees`` with its line where it is outside the bounds."""
    if not agreement.ok:
        raise Int8Disagrees(f"{agreement.line()}: this CPU's int8 kernels do not compute what the graph was built "
                            "to; use fp32 (IMGSEARCH_ENGINE_PRECISION=fp32) here")
    return agreement


_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def runner(sess: Any) -> Run:
    """``sess.run`` taking the inputs by name, each float array converted to the type the graph declares for it
    where it differs (stored features come as float16; the int8 rerank graph takes them so, the others as float32)."""
    declared = {i.name: _FLOATS.get(i.type) for i in sess.get_inputs()}

    def run(**inputs: Any) -> Any:
        return sess.run(None, {k: v.astype(declared[k], copy=False) if declared.get(k) and v.dtype.kind == "f" else v
                               for k, v in inputs.items()})
    return run


def _plain(graph: Path) -> tuple[Run, list[str]]:
    """A plain one-thread ONNX Runtime session (in a process that made no global thread pool)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
    return runner(sess), [o.name for o in sess.get_outputs()]


def check_folder(folder: Path, recipe: str = "*",
                 session: Callable[[Path], tuple[Run, list[str]]] = _plain) -> list[dict[str, Any]]:
    """Every int8 graph under ``folder`` (of one recipe, or all) through its probe, on sessions ``session``
    opens (``run``, output names)."""
    out = []
    for graph in sorted(folder.rglob(f"*.int8-{recipe}.onnx")):
        a = measure(graph, *session(graph))
        out.append({"graph": a.graph, "cosine": round(a.cosine, 5), "itm_diff": round(a.itm_diff, 5), "ok": a.ok,
                    "ms": round(a.ms, 1)})
    return out


if __name__ == "__main__":  # python -m engines.selfcheck FOLDER [RECIPE]: one JSON line per int8 graph
    for row in check_folder(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "*"):
        print(json.dumps(row))

"""Run a command as if on a lesser x86 CPU, to measure figures for CPUs this machine stands in for.

``bench/cpumask.c``, built here with the system's C compiler into ``build/cpumask.so``, is preloaded into the
command (and every process it starts): each ``cpuid`` faults and is answered with the lesser CPU's features, so
torch (ATen's kernels, and cpuinfo, which decides where its int8 products go), oneDNN, MKL and ONNX Runtime all
dispatch as they would there. oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``) is set to match, so the product's own
reading of the CPU (``engines.auto.cpu``: /proc/cpuinfo, which the kernel writes, less what the cap leaves out)
agrees with the libraries'.

A cap alone is not enough: with ``ONEDNN_MAX_CPU_ISA=AVX2`` on a CPU with VNNI, torch still sends ``_int_mm`` to
oneDNN (which then runs its AVX2 kernels), but on a real AVX2-only CPU torch 2.13 never does, and runs a reference
loop instead (on a 2-core AMX Xeon under ``avx2``, 264 x 768 by 768 x 768: 72 ms against fp32's 1.6).

    python -m bench.cpumask avx2 -- python -m bench.rerank --precision fp32   # an AVX2-only CPU (EPYC Zen 2/3)
    python -m bench.cpumask vnni -- python -m bench.load ...                  # VNNI without bf16 (Cascade Lake)
    python -m bench.cpumask --quick        # what torch, oneDNN and ONNX Runtime see under each kind (JSON)

It needs CPUID faulting (Intel CPUs and their VMs: ``cpuid_fault`` in /proc/cpuinfo); elsewhere the command is
not run (exit 97) and ``--quick`` reports ``"supported": false``. The masked CPU runs the lesser kernels on this
CPU's cores: compare figures within one run, and read them as "this CPU with those kernels", not as that CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "cpumask.c"
KINDS = {"avx2": "AVX2", "vnni": "AVX512_CORE_VNNI"}  # the kind -> the oneDNN cap that matches it
UNSUPPORTED = 97  # the library's exit status where CPUID faulting is not available


def build(out: Path = ROOT / "build" / "cpumask.so") -> Path:
    """The preload library, compiled where missing or older than its source."""
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench.cpumask needs a C compiler (make cxx installs Debian's g++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.so")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"], check=True)
    tmp.replace(out)
    return out


def environment(kind: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the library preloaded for ``kind``."""
    env = dict(os.environ if base is None else base)
    lib = str(build())
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env["CPUMASK"] = kind
    env["ONEDNN_MAX_CPU_ISA"] = KINDS[kind]
    return env


PROBE = """
import json, torch, onnxruntime
from engines import intmm
from engines.auto import cpu
caps = torch.cpu.get_capabilities()
a = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
exact = torch.equal(torch._int_mm(a, a.t().contiguous()).double(), a.double() @ a.double().t())
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(),
                  "cpuinfo": sorted(k for k in ("avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                                "amx_int8") if caps.get(k)),
                  "product_flags": sorted(cpu()[1] & {"avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                       "amx_bf16", "amx_int8"}),
                  "int8_on_onednn": intmm.fast(), "int_mm_exact": exact}))
"""


def probe(kind: str | None) -> dict[str, object]:
    """What torch and the product see, in a fresh process under ``kind`` (None: unmasked)."""
    env = environment(kind) if kind else dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == UNSUPPORTED:
        return {"supported": False}
    if done.returncode != 0:
        raise SystemExit(f"probe under {kind} failed: {done.stderr[-2000:]}")
    return {"supported": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", nargs="?", choices=sorted(KINDS))
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run under the mask")
    ap.add_argument("--quick", action="store_true", help="probe each kind and print what the libraries see")
    args = ap.parse_args(argv)
    if args.quick:
        report = {"host": probe(None), **{k: probe(k) for k in sorted(KINDS)}}
        print(json.dumps(report))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.kind or not command:
        ap.error("a kind and a command: python -m bench.cpumask avx2 -- python -m bench.rerank")
    env = environment(args.kind)
    os.execvpe(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

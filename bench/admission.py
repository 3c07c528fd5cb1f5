"""Admission's cost: ``POST /v1/jobs`` per API process, with wrk (Debian's), against an API with no workers,
beside ``GET /healthz`` on the same process; ours against a baseline revision of this repository, in one run.

Each side gets its own redis-server and one uvicorn process (one event loop, as one API replica runs), no
worker: every job is admitted (key, rate limit, in-flight cap, queue cap, validation), written and sent, then
stays queued. Limits are on but never reached (a huge rate, no in-flight cap, no queue cap), so the figure is the
admission path's own cost, not a refusal's. wrk and the API share the machine's cores.

    python -m bench.admission                       # baseline 9d7ff05 (before the layout issue), 32 connections
    python -m bench.admission --baseline HEAD~3 --duration 20 --connections 64
    python -m bench.admission --quick                # 2 s runs, 8 connections, no warm-up runs: seconds
    python -m bench.admission --replica              # ours twice: one Redis, then a primary + replica and WAIT

Prints a table and the last line ``jobs_per_s_ratio=<ours / baseline>``; with ``--replica`` the sides are this
checkout on one Redis ("alone") and on a primary with one replica, every creation acknowledged only once the
replica confirmed it (``IMGSEARCH_REPLICA_ACKS=1``, WAIT bounded by ``replica_wait_ms``, "replicated"), and
the last line ``replicated_jobs_per_s_ratio=<replicated / alone>``. Needs ``wrk`` (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cli import stack

ROOT = Path(__file__).resolve().parents[1]
BODY = {"query": "a surprised pikachu face", "limit": 10, "filter": {"subreddit": ["memes", "me_irl"]}}
ENV = {"IMGSEARCH_RATE_LIMIT_PER_MIN": "100000000", "IMGSEARCH_RATE_LIMIT_BURST": "100000000",
       "IMGSEARCH_MAX_JOBS_IN_FLIGHT": "0", "IMGSEARCH_MAX_QUEUE_LENGTH": "0", "IMGSEARCH_REAPER_INTERVAL_S": "0",
       "IMGSEARCH_LOG_LEVEL": "WARNING"}


def _tree(rev: str, into: Path) -> Path:
    """The repository at ``rev`` (its committed files) under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def _wrk(url: str, seconds: int, connections: int, script: Path | None) -> dict[str, float]:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"] + (["-s", str(script)] if script else [])
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {"per_s": rps, "requests": total, "non_2xx": int(bad.group(1)) if bad else 0,
            "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan")}


def _replica(primary: int, work: Path) -> stack.Proc:
    """A replica of the Redis at ``primary``, once it is in sync."""
    import redis as redis_py

    port = stack.free_port()
    proc = stack.start_redis(port, work / "replica", work / "replica.log", extra=["--replicaof", "127.0.0.1", str(primary)])
    client = redis_py.Redis(port=primary, decode_responses=True)
    stack.wait_for(lambda: client.info("replication").get("slave0", {}).get("state") == "online", 30, "the replica")
    return proc


def _waits(port: int) -> int:
    import redis as redis_py

    stats = redis_py.Redis(port=port).info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def measure(tree: Path, work: Path, seconds: int, connections: int, warm_s: int = 2,
            replica: bool = False) -> dict[str, Any]:
    """``POST /v1/jobs`` and ``GET /healthz`` on one API process of ``tree`` (``replica``: its Redis has one,
    and creations wait for it)."""
    work.mkdir(parents=True, exist_ok=True)
    redis_port, api_port = stack.free_port(), stack.free_port()
    redis = stack.start_redis(redis_port, work, work / "redis.log")
    follower = _replica(redis_port, work) if replica else None
    env = {**ENV, "PYTHONPATH": str(tree), "IMGSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "IMGSEARCH_DATA_DIR": str(work / "data"), "IMGSEARCH_REPLICA_ACKS": "1" if replica else "0"}
    # --app-dir: the tree's packages first on sys.path (`python -m` would put the caller's working directory,
    # this checkout, there: both sides would run ours)
    api = stack._spawn("api", [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--app-dir",
                               str(tree), "--host", "127.0.0.1", "--port", str(api_port), "--no-access-log",
                               "--log-level", "warning"], env, work / "api.log")
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(json.dumps(BODY))}\n")
    base = f"http://127.0.0.1:{api_port}"
    try:
        stack.wait_for(lambda: stack.http_ok(base + "/healthz"), 60, "the API", interval=0.2)
        if warm_s:
            _wrk(base + "/healthz", warm_s, connections, None)  # warm both paths up
            _wrk(base + "/v1/jobs", warm_s, connections, script)
        out = {"jobs": _wrk(base + "/v1/jobs", seconds, connections, script),
               "healthz": _wrk(base + "/healthz", seconds, connections, None)}
        out["jobs"]["waits"] = _waits(redis_port)  # WAITs the primary ran: one per job with a replica, else none
        return out
    finally:
        api.stop()
        if follower is not None:
            follower.stop()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="9d7ff05", help="the revision to compare with (git rev)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/admission.json (--quick: none)")
    ap.add_argument("--quick", action="store_true", help="2 s per run, 8 connections, no warm-up runs")
    ap.add_argument("--replica", action="store_true",
                    help="compare this checkout on one Redis with it on a primary + replica, creations WAITed for")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.connections = 2, 8
    elif args.out is None:
        args.out = ROOT / "bench" / "results" / ("admission_replica.json" if args.replica else "admission.json")
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp:
        root = Path(tmp)
        sides = {"alone": ROOT, "replicated": ROOT} if args.replica else \
            {"baseline": _tree(args.baseline, root / "baseline"), "ours": ROOT}
        report: dict[str, Any] = {"cpu": _cpu(), "cores": os.cpu_count(), "connections": args.connections,
                                  "duration_s": args.duration, "baseline": None if args.replica else args.baseline}
        for name, tree in sides.items():
            report[name] = measure(tree, root / name / "run", args.duration, args.connections, 0 if args.quick else 2,
                                   replica=name == "replicated")
    print(f"{'':10} {'POST /v1/jobs per s':>20} {'p50 ms':>8} {'non-2xx':>8} {'WAITs':>8} {'GET /healthz per s':>20} "
          f"{'p50 ms':>8}")
    for name in sides:
        j, h = report[name]["jobs"], report[name]["healthz"]
        print(f"{name:10} {j['per_s']:20.1f} {j['p50_ms']:8.2f} {j['non_2xx']:8d} {j['waits']:8d} {h['per_s']:20.1f} "
              f"{h['p50_ms']:8.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"cpu: {report['cpu']}, {report['cores']} cores; {args.connections} connections, {args.duration} s each")
    if args.replica:
        ratio = report["replicated"]["jobs"]["per_s"] / report["alone"]["jobs"]["per_s"]
        print(f"replicated_jobs_per_s_ratio={ratio:.2f}")
    else:
        print(f"jobs_per_s_ratio={report['ours']['jobs']['per_s'] / report['baseline']['jobs']['per_s']:.2f}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()

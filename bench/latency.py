"""Time from ``POST /v1/jobs`` to the final result, split by stage, through the real stack on loopback.

Starts redis-server, one worker and the API on the tiny models (or the models named by the usual
settings), runs each query ``--repeat`` times one after another, following the job's SSE stream (so
the client sees ``done`` as soon as it is written), and prints medians as a table and as JSON.

    python -m bench.latency [--repeat 30] [--out bench/results/latency.json]
    python -m bench.latency --quick   # 12 images, 3 rounds: a few seconds
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cli import stack

QUERIES = ("a red circle", "a blue square on a white background", "a yellow triangle")
STAGES = ("queue_wait", "encode", "retrieve", "fetch", "rerank", "fuse", "total")


def one(client: httpx.Client, base: str, query: str) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    r = client.post(f"{base}/v1/jobs", json={"query": query})
    r.raise_for_status()
    job_id = r.json()["id"]
    with client.stream("GET", f"{base}/v1/jobs/{job_id}/events") as resp:
        for line in resp.iter_lines():
            if line in ("event: done", "event: failed"):
                break
    elapsed = (time.perf_counter() - t0) * 1000
    job = client.get(f"{base}/v1/jobs/{job_id}").json()
    if job["status"] != "done":
        raise RuntimeError(f"job failed: {job.get('error')}")
    return elapsed, job["timings"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 images, 3 rounds of the queries")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--result-cache", action="store_true",
                    help="leave the query result cache on (off by default: repeats would measure only the cache)")
    args = ap.parse_args()
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: every process started here is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.repeat, args.images = min(args.repeat, 3), min(args.images, 12)

    from cli.demo import prepare

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env, _ = prepare(root / "data", args.images)
        procs = [stack.start_redis(rport := stack.free_port(), root / "redis")]
        env["IMGSEARCH_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        if not args.result_cache:
            env["IMGSEARCH_CACHE_RESULTS_TTL_S"] = "0"
        port = stack.free_port()
        base = f"http://127.0.0.1:{port}"
        try:
            procs.append(stack.start_worker(env, root / "worker.log"))
            procs.append(stack.start_api(env, port, root / "api.log"))
            stack.wait_for(lambda: stack.api_ready(base), 120, "the stack", interval=0.1)
            with httpx.Client(timeout=60) as client:
                for q in QUERIES:  # warm-up: first-call costs are not what a user waits for
                    one(client, base, q)
                runs = [one(client, base, q) for _ in range(args.repeat) for q in QUERIES]
        finally:
            for p in reversed(procs):
                p.stop()

    e2e = [r[0] for r in runs]
    stages = STAGES if "encode" in runs[0][1] else ("queue_wait", "cache", "total")
    med = {s: statistics.median(r[1][s] for r in runs) for s in stages}
    med["end_to_end"] = statistics.median(e2e)
    med["end_to_end_p95"] = sorted(e2e)[int(0.95 * (len(e2e) - 1))]
    med["outside_worker"] = med["end_to_end"] - med["total"] - med["queue_wait"]
    report = {"queries": len(runs), "median_ms": {k: round(v, 2) for k, v in med.items()}}
    print(f"{len(runs)} queries, tiny models, 1 worker (prefork, 1 process), medians in ms")
    print("| stage | ms |\n|---|---|")
    for k in ("end_to_end", "end_to_end_p95", *stages, "outside_worker"):
        print(f"| {k} | {med[k]:.2f} |")
    print(json.dumps(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

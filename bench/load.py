"""Throughput and latency under load, ours against the original's way, on the same models, data and machine.

Starts redis-server, one worker (threads, cross-query batching) and the API, and the baseline
(``bench.baseline``: one synchronous FastAPI process doing the original's per-candidate BLIP passes); then
for each concurrency, that many clients submit for a fixed time (ours: ``POST /v1/jobs`` and the job's event
stream; the baseline: ``POST /search``), and what each answered is counted: throughput, end-to-end
p50/p95/p99, per-stage p50/p95/p99, errors, lost jobs. Also: the lone query with batching off (the batching
cost), the queue's own overhead (a no-op job's round trip against a bare Redis round trip), the rerank stage's
achieved FLOP/s against a large matmul's, and each process's RSS. Writes JSON and a markdown table.

    python -m bench.load                      # BLIP-base sized random-weight models, concurrency 1 4 16 64,
                                              # ours on the default configuration (auto)
    python -m bench.load --quick              # tiny models, ours at 1 and 4, the baseline at 1, 3 s each:
                                              # under a minute
    python -m bench.load --compare-old-default --no-unbatched --concurrency 1,16   # the issue-26 table: auto
                                              # against torch fp32 (the default before auto) and the original;
                                              # the report's against_old_default gives each level's throughput
                                              # ratio and p50 share (ours over torch fp32's)
    python -m bench.load --kind image         # search by image (uploads; --kind like: stored posts), ours alone

Random-weight models cost what trained ones of the same shape do; rankings are meaningless, timings are not.
The last line printed is ``throughput_ratio=<ours / baseline at the highest concurrency both ran>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cli import stack

STAGES = ("queue_wait", "encode", "retrieve", "fetch", "rerank", "fuse", "total")
WORDS = ("red blue green yellow black white circle square triangle star small large two three shapes cat dog "
         "face meme surprised happy drawing photo of a on the with background").split()
OLD_DEFAULT = "torch fp32 (old default)"  # --compare-old-default's configuration: the default before auto


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- data: the same store for both systems ---
def prepare(root: Path, models: str, n: int) -> dict[str, str]:
    """Models and a store of ``n`` posts under ``root``: vectors, stored BLIP features (ours) and JPEG images
    (the baseline's pixels). Vectors and features are random with the real shapes: with random-weight models
    embedding the images would cost minutes and change no timing."""
    from engines.registry import load_engines
    from pipeline import features as featcodec
    from pipeline.demo_data import write_demo_images
    from pipeline.layout import feature_key, image_key, post_key
    from pipeline.settings import Settings
    from pipeline.stores import make_blob_store, make_vector_store

    if models == "tiny":
        from engines.tiny import make_tiny_models

        siglip, blip = make_tiny_models(root / "models")
    else:
        from engines.fullsize import make_fullsize_models

        made = make_fullsize_models(root / "models", which=("siglip", "blip-base" if models == "base" else "blip"))
        siglip, blip = made["siglip"], made["blip-base" if models == "base" else "blip"]
    env = {"IMGSEARCH_DATA_DIR": str(root / "data"), "IMGSEARCH_SIGLIP_MODEL": str(siglip),
           "IMGSEARCH_BLIP_MODEL": str(blip), "IMGSEARCH_CACHE_RESULTS_TTL_S": "0"}
    s = Settings(data_dir=root / "data", engines={"siglip_model": str(siglip), "blip_model": str(blip), "backend": "torch",
                                                  "precision": "fp32"})
    engines = load_engines(s)
    dim = engines.text.encode_text(["x"]).shape[1]
    img_dir = write_demo_images(root / "images", min(n, 64), size=128)
    pics = sorted(img_dir.glob("*.png"))
    from PIL import Image

    probe = engines.reranker.vision_features([Image.open(pics[0])])[0]
    rng = np.random.default_rng(0)
    vectors, blobs = make_vector_store(s), make_blob_store(s)
    rows = []
    for i in range(n):
        pid = f"p{i:05d}"
        v = rng.standard_normal(dim).astype(np.float32)
        rows.append((pid, v / np.linalg.norm(v), {"title": f"post {i}", "subreddit": "bench"}))
        blobs.put(feature_key(engines.reranker.version, pid),
                  featcodec.encode(rng.standard_normal(probe.shape).astype(np.float16)))
        with Image.open(pics[i % len(pics)]) as im:
            import io

            buf = io.BytesIO()
            im.convert("RGB").resize((384, 384)).save(buf, "JPEG", quality=85)
        blobs.put(image_key(pid, "jpg"), buf.getvalue())
        blobs.put(post_key(pid), json.dumps({"id": pid}).encode())
    vectors.upsert(rows)
    vectors.close()  # type: ignore[attr-defined]
    return env


# --- the queries: keyword arguments of a POST, drawn with a client's own random generator ---
Request = dict[str, Any]


def text_queries(rnd: random.Random) -> Request:
    return {"json": {"query": " ".join(rnd.choice(WORDS) for _ in range(5))}}


def like_queries(posts: int) -> Any:
    return lambda rnd: {"json": {"like": f"p{rnd.randrange(posts):05d}"}}


def image_queries(root: Path) -> Any:
    """Uploads of the demo pictures (PNG, 128 px), each a multipart body as a client sends it."""
    pictures = [p.read_bytes() for p in sorted((root / "images").glob("*.png"))]
    return lambda rnd: {"files": {"image": ("query.png", rnd.choice(pictures), "image/png")}}


# --- the two systems ---
async def ours_call(client: httpx.AsyncClient, request: Request, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.post("/v1/jobs", **request)
    if r.status_code != 202:
        return {"ok": False, "why": f"HTTP {r.status_code}"}
    job_id = r.json()["id"]
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
                if resp.status_code != 200:  # a refused stream is an error, not a job that never ended
                    return {"ok": False, "why": f"events HTTP {resp.status_code}"}
                async for line in resp.aiter_lines():
                    if line in ("event: done", "event: failed"):
                        break
    except TimeoutError:
        return {"ok": False, "lost": True, "why": "no end within the timeout"}
    e2e = (time.perf_counter() - t0) * 1000
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    if job["status"] != "done":
        return {"ok": False, "why": (job.get("error") or {}).get("code", job["status"])}
    return {"ok": True, "ms": e2e, "timings": job.get("timings", {})}


async def baseline_call(client: httpx.AsyncClient, request: Request, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/search", **request, timeout=timeout)
    except httpx.TimeoutException:
        return {"ok": False, "lost": True, "why": "no answer within the timeout"}
    if r.status_code != 200:
        return {"ok": False, "why": f"HTTP {r.status_code}"}
    return {"ok": True, "ms": (time.perf_counter() - t0) * 1000, "timings": r.json().get("timings", {})}


async def level(call: Any, base: str, concurrency: int, duration: float, timeout: float,
                queries: Any = text_queries) -> dict[str, Any]:
    """``concurrency`` clients, each submitting its next query when the last one ended, for ``duration``
    seconds; queries in flight at the end are waited for (up to ``timeout``) and counted."""
    done: list[dict[str, Any]] = []
    start = time.perf_counter()
    until = start + duration

    async def client(k: int) -> None:
        rnd = random.Random(k)
        async with httpx.AsyncClient(base_url=base, timeout=timeout) as c:
            while time.perf_counter() < until:
                try:
                    done.append(await call(c, queries(rnd), timeout))
                except httpx.HTTPError as exc:
                    done.append({"ok": False, "why": type(exc).__name__})

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = [d for d in done if d["ok"]]
    e2e = [d["ms"] for d in ok]
    stages = {st: [d["timings"][st] for d in ok if st in d["timings"]] for st in STAGES}
    return {"concurrency": concurrency, "seconds": round(elapsed, 2), "completed": len(ok),
            "throughput_qps": round(len(ok) / elapsed, 3),
            "e2e_ms": {q: round(_pct(e2e, p), 1) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
            "stages_ms": {st: {q: round(_pct(v, p), 1) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
                          for st, v in stages.items() if v},
            "errors": sum(1 for d in done if not d["ok"] and not d.get("lost")),
            "lost": sum(1 for d in done if d.get("lost")),
            "why": sorted({d["why"] for d in done if not d["ok"]})}


# --- the machine's limits ---
def queue_overhead(redis_url: str, settings_env: dict[str, str], n: int = 300) -> dict[str, float]:
    """A no-op job's round trip (record written, task sent, a worker ends it, the end read from its event
    stream) against a bare Redis round trip (PING), both p50 over ``n``."""
    import uuid

    import redis

    from pipeline.jobs.commands import SyncExecutor, Write
    from pipeline.jobs.keys import events_key
    from pipeline.settings import Settings
    from pipeline.types import Job
    from workers.celery_app import NOOP_TASK, client_app, send_job

    s = Settings(redis_url=redis_url, data_dir=Path(settings_env["IMGSEARCH_DATA_DIR"]))
    r = redis.Redis.from_url(redis_url)
    celery = client_app(s)
    x = SyncExecutor(r)
    pings, trips = [], []
    for i in range(n + 20):
        t0 = time.perf_counter()
        r.ping()
        ping = time.perf_counter() - t0
        job = Job(id=uuid.uuid4().hex, status="queued", query="noop", created_at=time.time(),
                  deadline_at=time.time() + 30)
        t0 = time.perf_counter()
        x.run(Write(job, 60, 64, (("queued", {"id": job.id}),), create=True))
        send_job(celery, NOOP_TASK, job.id, s.search_queue)
        last = "0"
        while True:
            got = r.xread({events_key(job.id): last}, block=5000)
            if not got:
                raise RuntimeError("a no-op job did not end within 5 s")
            entries = got[0][1]
            last = entries[-1][0]
            if any(f.get(b"event") == b"done" for _, f in entries):
                break
        trip = time.perf_counter() - t0
        if i >= 20:  # the first ones warm the connections
            pings.append(ping * 1000)
            trips.append(trip * 1000)
    celery.close()
    return {"redis_ping_p50_ms": round(statistics.median(pings), 3), "noop_job_p50_ms": round(statistics.median(trips), 3),
            "overhead_p50_ms": round(statistics.median(trips) - statistics.median(pings), 3)}


def flops_limit(env: dict[str, str], rerank_stage_ms: float | None, threads: int, n: int = 4096) -> dict[str, float]:
    """The rerank stage's achieved FLOP/s (its FLOPs counted by torch on the same call, over the worker's
    measured rerank time at concurrency 1) against a 4096 x 4096 fp32 matmul's FLOP/s on the same threads."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engines.blip import TorchBlip

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        runs.append(time.perf_counter() - t0)
    matmul = 2 * n ** 3 / min(runs)
    blip = TorchBlip(env["IMGSEARCH_BLIP_MODEL"])
    from PIL import Image

    probe = blip.vision_features([Image.new("RGB", (64, 64), "red")])[0]
    feats = [np.random.default_rng(i).standard_normal(probe.shape).astype(np.float16) for i in range(32)]
    query = "a surprised cat face on a white background"
    blip.score(query, feats)
    with FlopCounterMode(display=False) as counter:
        blip.score(query, feats)
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(3):
        blip.score(query, feats)
    in_process_ms = (time.perf_counter() - t0) / 3 * 1000
    ms = rerank_stage_ms or in_process_ms
    return {"matmul_gflops": round(matmul / 1e9, 1), "rerank_gflop": round(flops / 1e9, 2),
            "rerank_ms_in_process": round(in_process_ms, 1), "rerank_ms_worker_p50": round(ms, 1),
            "rerank_gflops": round(flops / (ms / 1000) / 1e9, 1),
            "rerank_share_of_matmul": round(flops / (ms / 1000) / matmul, 3)}


# --- the run ---
@contextlib.contextmanager
def ours_running(env: dict[str, str], root: Path, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Our worker and API for one phase: yields (base URL, the worker's own heartbeat: its pid, its engines) and
    stops both on the way out, whatever happened."""
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    procs = [stack.start_worker(env, root / f"{name}-worker.log", name=name)]
    try:
        procs.append(stack.start_api(env, port, root / f"{name}-api.log"))
        stack.wait_for(lambda: stack.api_ready(base) and worker_beat(base, procs[0].pid) is not None
                       or not all(p.alive() for p in procs), 300, "our stack", interval=0.2)
        if not all(p.alive() for p in procs):
            raise RuntimeError(f"our {name} stack exited at start; see {root}/{name}-*.log")
        yield base, worker_beat(base, procs[0].pid)  # type: ignore[misc]
    finally:
        for p in reversed(procs):
            p.stop()


def worker_beat(base: str, started: int) -> dict[str, Any] | None:
    """The heartbeat of the process that serves jobs for the worker started as ``started`` (itself, or its pool's
    child), from those /readyz lists; None while it has none. Never another phase's worker."""
    try:
        beats = httpx.get(f"{base}/readyz", timeout=5).json().get("workers", [])
    except (httpx.HTTPError, ValueError):
        return None
    return next((b for b in beats if started in (b.get("pid"), b.get("parent"))), None)


@contextlib.contextmanager
def baseline_running(env: dict[str, str], root: Path) -> Iterator[tuple[stack.Proc, str]]:
    port = stack.free_port()
    proc = stack._spawn("baseline", [sys.executable, "-m", "bench.baseline", "--port", str(port)], env,
                        root / "baseline.log")
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for(lambda: stack.http_ok(f"{base}/healthz") or not proc.alive(), 300, "the baseline",
                       interval=0.2)
        if not proc.alive():
            raise RuntimeError(f"the baseline did not start; see {root / 'baseline.log'}")
        yield proc, base
    finally:
        proc.stop()


def run_system(call: Any, base: str, levels: list[int], duration: float, timeout: float, pid: int | None,
               label: str, queries: Any = text_queries) -> list[dict[str, Any]]:
    rows = []
    asyncio.run(level(call, base, 1, min(duration / 3, 5), timeout, queries))  # warm-up, not counted
    for c in levels:
        rss0 = _rss_mb(pid) if pid else float("nan")
        row = asyncio.run(level(call, base, c, duration, timeout, queries))
        row.update(system=label, rss_mb_start=round(rss0, 1), rss_mb_end=round(_rss_mb(pid), 1) if pid else None)
        print(f"  {label} c={c}: {row['throughput_qps']} q/s, p50 {row['e2e_ms']['p50']} ms, "
              f"p99 {row['e2e_ms']['p99']} ms, errors {row['errors']}, lost {row['lost']}", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| system | concurrency | q/s | p50 ms | p95 ms | p99 ms | encode p50 | rerank p50 | queue p50 | errors | lost |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stages_ms"]
        out.append(f"| {r['system']} | {r['concurrency']} | {r['throughput_qps']} | {r['e2e_ms']['p50']} | "
                   f"{r['e2e_ms']['p95']} | {r['e2e_ms']['p99']} | {st.get('encode', {}).get('p50', '-')} | "
                   f"{st.get('rerank', {}).get('p50', '-')} | {st.get('queue_wait', {}).get('p50', '-')} | "
                   f"{r['errors']} | {r['lost']} |")
    return "\n".join(out)


def stage_table(rows: list[dict[str, Any]]) -> str:
    """Each row's latency split by stage: p50 / p95 in milliseconds."""
    out = ["| system | concurrency | q/s | e2e p50 / p95 | " + " | ".join(STAGES) + " |",
           "|---|---|---|---|" + "---|" * len(STAGES)]
    for r in rows:
        st = r["stages_ms"]
        cells = [f"{st[s]['p50']} / {st[s]['p95']}" if s in st else "-" for s in STAGES]
        out.append(f"| {r['system']} | {r['concurrency']} | {r['throughput_qps']} | {r['e2e_ms']['p50']} / "
                   f"{r['e2e_ms']['p95']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def image_kinds(args: argparse.Namespace, env: dict[str, str], root: Path, levels: list[int], duration: float,
                timeout: float, report: dict[str, Any]) -> None:
    """Search by image (``--kind like`` or ``image``): ours alone (the original searched by words only), the
    latency split by stage at each level."""
    queries = like_queries(args.posts) if args.kind == "like" else image_queries(root)
    with ours_running(env, root, "ours") as (base, beat):
        rows = run_system(ours_call, base, levels, duration, timeout, beat["pid"], f"ours, {args.kind} queries",
                          queries)
    report["rows"] = rows
    md = stage_table(rows)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(md + "\n")


def _build_compiled(env: dict[str, str], precision: str, engine_dir: Path) -> dict[str, Any]:
    """The compiled rerank ours will load: at the precision set, else the one auto picks first on this CPU."""
    from engines import compiled
    from engines.auto import torch_cpu_precision
    from engines.blip import TorchBlip

    if precision not in compiled.PRECISIONS:
        precision = torch_cpu_precision()
    print(f"compiling the torch rerank ({precision}) for this host", flush=True)
    t0 = time.perf_counter()
    blip = TorchBlip(env["IMGSEARCH_BLIP_MODEL"], precision=precision, compiled="off")
    path = compiled.build(blip, engine_dir)
    del blip
    return {"package": path.name, "build_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, 64 posts, concurrency 1 and 4, 3 s each, no batching-off phase: under a minute")
    ap.add_argument("--models", choices=("tiny", "base", "large"), default=None,
                    help="base: BLIP ITM base sized (default); large: the product's BLIP-large; tiny: --quick's")
    ap.add_argument("--concurrency", default=None, help="levels for ours (default 1,4,16,64)")
    ap.add_argument("--baseline-concurrency", default=None,
                    help="levels for the baseline (default: 1 and 16 of ours; it answers one query at a time, so "
                         "higher levels only lengthen its queue)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level (default 40)")
    ap.add_argument("--posts", type=int, default=256)
    ap.add_argument("--backend", default="auto", help="our engines: auto (the default configuration: chosen per "
                    "CPU at worker start), torch, onnxruntime or tensorrt")
    ap.add_argument("--precision", default=None, help="default: auto with --backend auto, int8 for onnxruntime, "
                    "fp32 for torch")
    ap.add_argument("--compare-old-default", action="store_true",
                    help="also run ours on torch fp32 (the default before `auto`) at the same levels")
    ap.add_argument("--no-baseline", action="store_true", help="skip the original's way")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both systems")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also run ours with BLIP's plain cross-attention (as before the rewrite) at the same levels, "
                         "on --plain-backend/--plain-precision")
    ap.add_argument("--plain-backend", default="onnxruntime", help="default onnxruntime (int8): the fastest CPU "
                    "backend without the rewrite (bench.engines)")
    ap.add_argument("--plain-precision", default=None)
    ap.add_argument("--compiled", action="store_true",
                    help="build the torch rerank compiled for this host first (engines/compiled.py: bf16 on a CPU with "
                         "native bf16, else fp32), so ours runs it as a worker with it built does (about a minute)")
    ap.add_argument("--no-unbatched", action="store_true", help="skip the lone query with batching off")
    ap.add_argument("--kind", choices=("text", "like", "image"), default="text",
                    help="the queries: words (default, against the baseline), stored posts (like) or uploaded "
                         "pictures (image), ours alone")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: every process started here is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    models = args.models or ("tiny" if args.quick else "base")
    if args.quick:
        args.no_unbatched = True
        args.posts = min(args.posts, 64)
    levels = [int(x) for x in (args.concurrency or ("1,4" if args.quick else "1,4,16,64")).split(",")]
    base_levels = [int(x) for x in args.baseline_concurrency.split(",")] if args.baseline_concurrency else \
        ([1] if args.quick else [c for c in levels if c in (1, 16)] or levels[:1])
    duration = args.duration or (3.0 if args.quick else 40.0)
    backend = args.backend
    precision = args.precision or {"auto": "auto", "onnxruntime": "int8"}.get(backend, "fp32")
    compare = [(OLD_DEFAULT, {"IMGSEARCH_ENGINE_BACKEND": "torch", "IMGSEARCH_ENGINE_PRECISION": "fp32",
                              "IMGSEARCH_ENGINES__COMPILED": "off"})] \
        if args.compare_old_default else []
    queue_n = 30 if args.quick else 300
    timeout = 900.0
    report: dict[str, Any] = {"models": models, "threads": args.threads, "posts": args.posts, "duration_s": duration,
                              "machine": f"{os.cpu_count()} CPUs", "ours": f"{backend} {precision}",
                              "baseline": "torch fp32, the original's per-candidate passes", "kind": args.kind}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"preparing {models} models and {args.posts} posts", flush=True)
        env = prepare(root, models, args.posts)
        env["IMGSEARCH_TORCH_THREADS"] = str(args.threads)
        baseline_env = dict(env)
        env.update(IMGSEARCH_ENGINE_BACKEND=backend, IMGSEARCH_ENGINE_PRECISION=precision)
        plain_precision = args.plain_precision or ("int8" if args.plain_backend == "onnxruntime" else "fp32")
        plain_env = {**env, "IMGSEARCH_ENGINE_BACKEND": args.plain_backend,
                     "IMGSEARCH_ENGINE_PRECISION": plain_precision, "IMGSEARCH_BLIP_CROSS_ATTENTION": "plain"}
        ort_precisions = {p for b, p in ((backend, precision), (args.plain_backend, plain_precision))
                          if b == "onnxruntime" and (b == backend or args.compare_plain)}
        if backend == "auto":  # the engines auto may measure on this CPU
            from engines.auto import onnx_precisions_needed

            ort_precisions |= set(onnx_precisions_needed())
        if ort_precisions:
            from engines.export import build_onnx

            print(f"building ONNX Runtime {sorted(ort_precisions)} engines", flush=True)
            t0 = time.perf_counter()
            build_onnx(env["IMGSEARCH_SIGLIP_MODEL"], env["IMGSEARCH_BLIP_MODEL"], root / "data" / "engines",
                       precisions=tuple(sorted(ort_precisions)))
            report["engine_build_s"] = round(time.perf_counter() - t0, 1)
        if args.compiled and backend in ("auto", "torch"):
            report["compiled"] = _build_compiled(env, precision, root / "data" / "engines")
        if args.compare_plain:
            report["ours_plain"] = f"{args.plain_backend} {plain_precision}, plain cross-attention"
        # one client address opens every stream here: the per-caller caps would refuse most of them
        no_caps = {"IMGSEARCH_RATE_LIMIT_PER_MIN": "0", "IMGSEARCH_MAX_JOBS_IN_FLIGHT": "0",
                   "IMGSEARCH_MAX_STREAMS_PER_CALLER": "0"}
        plain_env.update(no_caps)
        env.update(no_caps)
        rport = stack.free_port()
        redis_proc = stack.start_redis(rport, root / "redis", root / "redis.log")
        env["IMGSEARCH_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        rows: list[dict[str, Any]] = []
        try:
            if args.kind != "text":
                image_kinds(args, env, root, levels, duration, timeout, report)
                return
            if not args.no_unbatched:  # ours, batching off: the lone query's cost without the batcher
                with ours_running({**env, "IMGSEARCH_BATCH_MAX": "1"}, root, "unbatched") as (base, beat):
                    rows += run_system(ours_call, base, [1], duration, timeout, beat["pid"], "ours, batching off")
            if args.compare_plain:  # ours as before the rewrite, on its best backend then
                plain_env["IMGSEARCH_REDIS_URL"] = env["IMGSEARCH_REDIS_URL"]
                with ours_running(plain_env, root, "plain") as (base, beat):
                    rows += run_system(ours_call, base, levels, duration, timeout, beat["pid"],
                                       "ours, plain cross-attention")
            for label, extra in compare:  # other configurations of ours, at the same levels
                with ours_running({**env, **extra}, root, label.split()[0] + "-" + label.split()[1]) as (base, beat):
                    rows += run_system(ours_call, base, levels, duration, timeout, beat["pid"], f"ours, {label}")
            with ours_running(env, root, "ours") as (base, beat):
                report["ours_engines"] = {k: beat.get(k) for k in ("backend", "precision", "auto", "auto_measured_ms",
                                                                  "rerank_compiled")}
                print(f"  ours runs {beat.get('backend')} {beat.get('precision')}: {beat.get('auto', 'set')}", flush=True)
                rows += run_system(ours_call, base, levels, duration, timeout, beat["pid"], "ours")
                report["queue"] = queue_overhead(env["IMGSEARCH_REDIS_URL"], env, n=queue_n)
                print(f"  queue: {report['queue']}", flush=True)
            if not args.no_baseline:
                with baseline_running({**baseline_env, "IMGSEARCH_REDIS_URL": env["IMGSEARCH_REDIS_URL"]},
                                      root) as (bproc, bbase):
                    rows += run_system(baseline_call, bbase, base_levels, duration, timeout, bproc.pid, "baseline")
            lone = next(r for r in rows if r["system"] == "ours" and r["concurrency"] == 1)
            report["limits"] = flops_limit(env, lone["stages_ms"].get("rerank", {}).get("p50"), args.threads,
                                           1024 if args.quick else 4096)
            ran = report["ours_engines"]
            report["limits"]["note"] = (f"FLOPs counted on the torch fp32 graph; the worker ran {ran['backend']} "
                                        f"{ran['precision']}, so its FLOP/s is fp32-equivalent work per second")
        finally:
            redis_proc.stop()
    report["rows"] = rows
    ours = {r["concurrency"]: r for r in rows if r["system"] == "ours"}
    base_rows = {r["concurrency"]: r for r in rows if r["system"] == "baseline"}
    both = sorted(set(ours) & set(base_rows)) or sorted(ours)
    top = both[-1]
    base_rows = base_rows or {top: {"throughput_qps": float("nan"), "e2e_ms": {"p99": float("nan")}}}
    unbatched = next((r for r in rows if r["system"] == "ours, batching off"), ours[min(ours)])
    plain = {r["concurrency"]: r for r in rows if r["system"] == "ours, plain cross-attention"}
    if plain:
        report["rewrite"] = versus(ours, plain)
        report["rewrite"]["qps_c_max_over_c1"] = round(ours[max(ours)]["throughput_qps"] / ours[min(ours)]["throughput_qps"], 3)
    old_default = {r["concurrency"]: r for r in rows if r["system"] == f"ours, {OLD_DEFAULT}"}
    if old_default:  # issue 26's targets: the lone query's p50 share, and c=16 throughput, against torch fp32
        report["against_old_default"] = versus(ours, old_default)
    report["summary"] = {
        "throughput_ratio_at": top,
        "throughput_ratio": round(ours[top]["throughput_qps"] / max(base_rows[top]["throughput_qps"], 1e-9), 2),
        "p99_ratio_at": top,
        "p99_ratio": round(base_rows[top]["e2e_ms"]["p99"] / ours[top]["e2e_ms"]["p99"], 2),
        "lone_query_p50_ms_batching_on_off": [ours[1]["e2e_ms"]["p50"], unbatched["e2e_ms"]["p50"]],
        "seconds": round(time.perf_counter() - t_start, 1)}
    md = table(rows)
    print(md)
    shown = ("queue", "limits", "summary", "rewrite", "against_old_default")
    print(json.dumps({k: report[k] for k in shown if k in report}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(md + "\n")
    print(f"throughput_ratio={report['summary']['throughput_ratio']}")


def versus(ours: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Ours against another system's rows (by concurrency), at each concurrency both ran: throughput ratio, and
    end-to-end p50 as a ratio (theirs over ours) and as a share (ours over theirs)."""
    out: dict[str, Any] = {}
    for c in sorted(set(ours) & set(other)):
        mine, theirs = ours[c]["e2e_ms"]["p50"], other[c]["e2e_ms"]["p50"]
        out[f"c{c}"] = {"qps_ratio": round(ours[c]["throughput_qps"] / max(other[c]["throughput_qps"], 1e-9), 2),
                        "p50_ratio": round(theirs / max(mine, 1e-9), 2), "p50_share": round(mine / max(theirs, 1e-9), 3)}
    return out


if __name__ == "__main__":
    main()

"""Store figures: the embedded vector index at scale, and feature fetch for one query's 32 candidates.

    python -m bench.stores            # 1,000,000 x 768 (about 3 GB of vectors; ~10 minutes on 2 cores)
    python -m bench.stores --n 100000 # smaller
    python -m bench.stores --quick    # 20,000 x 128, 50 queries: seconds (the method, not the figures)
The last line is the report as one line of JSON.

Index: generated clustered data (``--data hierarchical``, the default: topics of themes of near neighbours
plus 10% loners, structured at every scale as image embeddings are; ``--data isotropic``: the stress case of
one level of clusters plus 10% pure noise), build time, resident memory against the raw vectors, recall@32
against brute force, p50/p99 query latency unfiltered, with a filter that keeps ~10% of the vectors
(``subreddit == "s0"``), and with search's default filter (NSFW out).
Fetch: 32 full-size BLIP-large feature blobs (577 x 1024 float16, 1.2 MB each) from the blob store (a
local folder; the OS page cache holds them, so this is the best case for "cold"), from Redis, and from
the worker's in-process LRU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _unit(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    v = rng.standard_normal((m, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def hierarchical(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Structure at every scale, as image embeddings have it: fields (10,000 vectors each) of topics (1,000) of
    themes (about 100; cosine 0.4 to 0.9 between two of one theme, 0.3 to 0.6 across sibling themes, 0.1 to 0.3
    across sibling topics, ~0 across fields), and 10% loners that belong to a topic but to no theme (their
    nearest are the topic's vectors). L2-normalised; returns the vectors and the mask of loners."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // 1000)
    fields = _unit(rng, max(1, n_topics // 10), d)
    topics = fields.repeat(10, 0)[:n_topics] + 1.0 * _unit(rng, n_topics, d)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    themes = topics.repeat(10, 0) + 0.8 * _unit(rng, n_topics * 10, d)
    themes /= np.linalg.norm(themes, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    loner = np.zeros(n, bool)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        theme = rng.integers(0, len(themes), m)
        # how far a vector strays from its theme varies (cosine to it 0.64 to 0.96): no plateau of ties
        block = themes[theme] + rng.uniform(0.3, 1.2, (m, 1)).astype(np.float32) * _unit(rng, m, d)
        lone = rng.random(m) < 0.1
        block[lone] = topics[theme[lone] // 10] + 1.0 * _unit(rng, int(lone.sum()), d)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
        loner[start:start + m] = lone
    return out, loner


def isotropic(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The stress case: one level of tight clusters (about 100 vectors each) at random, mutually orthogonal
    centres, plus 10% spread (isotropic: no neighbours at all). Beyond a query's own cluster every vector is a
    near-tie (cosine ~0 +- 0.04), so a filtered top 32, or any top 32 near a spread vector, is a draw from noise
    that only an exhaustive scan reproduces. L2-normalised; returns the vectors and the mask of spread ones."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 100)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    is_spread = np.zeros(n, bool)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = centres[rng.integers(0, n_clusters, m)] + 0.35 * rng.standard_normal((m, d)).astype(np.float32)
        spread = rng.random(m) < 0.1
        block[spread] = rng.standard_normal((int(spread.sum()), d)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
        is_spread[start:start + m] = spread
    return out, is_spread


DATASETS = {"hierarchical": hierarchical, "isotropic": isotropic}


def brute_top(x: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray | None = None) -> list[list[int]]:
    """Exact top-k row indices for each query (optionally among ``rows`` only)."""
    sub = x if rows is None else x[rows]
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(sub), 200_000):
        s = q @ sub[start:start + 200_000].T
        idx = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, idx, 1)], 1)
        best_i = np.concatenate([best_i, idx + start], 1)
        keep = np.argsort(-best_s, 1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return [(rows[r] if rows is not None else r).tolist() for r in best_i]


def pct(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(p * len(values)))]


def bench_index(n: int, d: int, queries: int, root: Path, sweep: tuple[int, ...] = (),
                data: str = "hierarchical", query_noise: float = 0.3) -> dict[str, Any]:
    from pipeline.stores.local_vector import LocalVectorStore

    x, is_spread = DATASETS[data](n, d)
    rng = np.random.default_rng(1)
    # queries near stored images (a text embedding lands near, not on, its image): noise of norm query_noise
    at = rng.integers(0, n, queries)
    # recall is reported apart for queries near clustered vectors and near the loners / spread ones
    q_spread = is_spread[at]
    q = x[at] + (query_noise / np.sqrt(d)) * rng.standard_normal((queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    subs = rng.integers(0, 10, n)
    nsfw = rng.random(n) < 0.02  # search's default filter leaves these out: {"over_18": {"$ne": true}}
    rss0 = rss_mb()
    store = LocalVectorStore(root / "vectors")
    t0 = time.perf_counter()
    for start in range(0, n, 20_000):
        store.upsert([(f"p{i}", x[i], {"subreddit": f"s{subs[i]}", "score": int(i % 5000), "over_18": bool(nsfw[i])})
                      for i in range(start, min(n, start + 20_000))])
    store.save()
    build_s = time.perf_counter() - t0
    mem_mb = rss_mb() - rss0
    raw_mb = n * d * 4 / 2**20
    k = 32
    flt = {"subreddit": "s0"}
    truth = brute_top(x, q, k)
    truth_f = brute_top(x, q, k, np.flatnonzero(subs == 0))
    sfw = {"over_18": {"$ne": True}}
    truth_d = brute_top(x, q, k, np.flatnonzero(~nsfw))

    lat_d, rec_d = [], []

    def measure() -> tuple[list[float], list[float], list[float], list[float]]:
        lat, lat_f, rec, rec_f = [], [], [], []
        lat_d.clear()
        rec_d.clear()
        for i in range(queries):
            t = time.perf_counter()
            got = store.query(q[i], k, filter=sfw)
            lat_d.append((time.perf_counter() - t) * 1000)
            rec_d.append(len({int(m.id[1:]) for m in got} & set(truth_d[i])) / k)
            t = time.perf_counter()
            got = store.query(q[i], k)
            lat.append((time.perf_counter() - t) * 1000)
            rec.append(len({int(m.id[1:]) for m in got} & set(truth[i])) / k)
            t = time.perf_counter()
            got = store.query(q[i], k, filter=flt)
            lat_f.append((time.perf_counter() - t) * 1000)
            rec_f.append(len({int(m.id[1:]) for m in got} & set(truth_f[i])) / k)
        return lat, lat_f, rec, rec_f

    def kinds(rec: list[float]) -> dict[str, float]:
        r = np.asarray(rec)
        return {"all": round(float(r.mean()), 4), "near_clusters": round(float(r[~q_spread].mean()), 4),
                "near_loners": round(float(r[q_spread].mean()), 4) if q_spread.any() else float("nan")}

    curve = []
    default = store.nprobe
    for nprobe in sweep:  # the recall/latency trade-off of the lists scanned, on the same built index
        store.nprobe = nprobe
        s_lat, s_lat_f, s_rec, s_rec_f = measure()
        curve.append({"nprobe": nprobe, "recall_at_32": kinds(s_rec), "p50_ms": round(statistics.median(s_lat), 3),
                      "filtered_recall_at_32": kinds(s_rec_f), "filtered_p50_ms": round(statistics.median(s_lat_f), 3)})
        print(json.dumps(curve[-1]), flush=True)
    store.nprobe = default
    lat, lat_f, rec, rec_f = measure()
    g = store._index("")
    return {"data": data, "query_noise": query_noise, "nprobe_sweep": curve, "n": n, "dim": d,
            "layout": f"IVF-Flat, {g.nlist} lists" if g.nlist else "flat",
            "nprobe": default, "build_s": round(build_s, 1), "memory_mb": round(mem_mb), "raw_vectors_mb": round(raw_mb),
            "memory_ratio": round(mem_mb / raw_mb, 2), "loner_query_fraction": round(float(q_spread.mean()), 3),
            "recall_at_32": kinds(rec), "p50_ms": round(statistics.median(lat), 3), "p99_ms": round(pct(lat, 0.99), 3),
            "filtered_fraction": round(float(np.mean(subs == 0)), 3), "filtered_recall_at_32": kinds(rec_f),
            "filtered_p50_ms": round(statistics.median(lat_f), 3), "filtered_p99_ms": round(pct(lat_f, 0.99), 3),
            "default_filter": "over_18 != true (2% of rows are NSFW)", "default_filter_recall_at_32": kinds(rec_d),
            "default_filter_p50_ms": round(statistics.median(lat_d), 3),
            "default_filter_p99_ms": round(pct(lat_d, 0.99), 3)}


def bench_fetch(root: Path, runs: int = 20) -> dict[str, Any]:
    import redis

    from cli import stack
    from pipeline import features
    from pipeline.cache import FeatureCache, LocalLRU
    from pipeline.layout import feature_key
    from pipeline.search.searcher import Searcher
    from pipeline.settings import Settings
    from pipeline.stores.local_blob import LocalBlobStore

    class _Reranker:
        version = "blip-large-bench"

    blobs = LocalBlobStore(root / "blobs")
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(32)]
    for pid in ids:
        blobs.put(feature_key(_Reranker.version, pid), features.encode(rng.standard_normal((577, 1024)).astype(np.float16)))
    port = stack.free_port()
    server = stack.start_redis(port, root / "redis")
    try:
        client = redis.Redis(port=port)
        s = Settings(data_dir=root, batch_max=1)  # fetch alone: no batcher around a reranker that never runs

        def timed(searcher: Searcher, prepare: Any = None) -> tuple[float, dict[str, int]]:
            times, counts = [], {}
            for _ in range(runs):
                if prepare:
                    prepare()
                counts = {}
                t = time.perf_counter()
                searcher.fetch(ids, counts)
                times.append((time.perf_counter() - t) * 1000)
            return statistics.median(times), counts

        cold = Searcher(s, None, None, blobs, _Reranker())  # type: ignore[arg-type]
        cache = FeatureCache(client, 3600, 10_000)
        warm = Searcher(s, None, None, blobs, _Reranker(), feature_cache=cache)  # type: ignore[arg-type]
        warm.fetch(ids)
        lru = LocalLRU(256 << 20)
        local = Searcher(s, None, None, blobs, _Reranker(), feature_cache=cache, local=lru)  # type: ignore[arg-type]
        local.fetch(ids)
        c_ms, c_counts = timed(cold)
        w_ms, w_counts = timed(Searcher(s, None, None, blobs, _Reranker(), feature_cache=cache))  # type: ignore[arg-type]
        l_ms, l_counts = timed(local)
    finally:
        server.stop()
    return {"candidates": 32, "feature_mb_each": round(577 * 1024 * 2 / 2**20, 2),
            "blob_store_p50_ms": round(c_ms, 2), "redis_p50_ms": round(w_ms, 2), "in_process_p50_ms": round(l_ms, 3),
            "sources": {"blob": c_counts, "redis": w_counts, "in_process": l_counts}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--data", choices=sorted(DATASETS), default="hierarchical",
                    help="hierarchical: structure at every scale, like image embeddings (default); isotropic: the stress case")
    ap.add_argument("--query-noise", type=float, default=0.3,
                    help="norm of the noise between a query and the stored vector it is drawn near (0.3: cosine ~0.96)")
    ap.add_argument("--nprobe-sweep", default="", help="comma-separated nprobe values to measure too, e.g. 4,8,32")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="20,000 x 128 vectors, 50 queries")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.queries = min(args.n, 20_000), min(args.dim, 128), min(args.queries, 50)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="build" if Path("build").is_dir() else None) as tmp:
        report["fetch"] = bench_fetch(Path(tmp))
        print(json.dumps(report["fetch"]))
        if not args.skip_index:
            sweep = tuple(int(v) for v in args.nprobe_sweep.split(",") if v)
            report["index"] = bench_index(args.n, args.dim, args.queries, Path(tmp), sweep, args.data, args.query_noise)
            print(json.dumps(report["index"]))
    f = report["fetch"]
    print("\n| feature fetch, 32 candidates | p50 ms |\n|---|---|")
    print(f"| blob store (local folder) | {f['blob_store_p50_ms']} |\n| Redis | {f['redis_p50_ms']} |\n"
          f"| in-process LRU | {f['in_process_p50_ms']} |")
    if "index" in report:
        i = report["index"]
        print(f"\n| embedded index, {i['n']:,} x {i['dim']}, {i['data']} data | figure |\n|---|---|")
        for key in ("layout", "nprobe", "build_s", "memory_mb", "raw_vectors_mb", "memory_ratio", "loner_query_fraction",
                    "recall_at_32", "p50_ms", "p99_ms", "filtered_fraction", "filtered_recall_at_32", "filtered_p50_ms",
                    "filtered_p99_ms", "default_filter", "default_filter_recall_at_32", "default_filter_p50_ms",
                    "default_filter_p99_ms"):
            print(f"| {key} | {i[key]} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

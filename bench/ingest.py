"""Ingest throughput on this CPU with the full-size SigLIP image tower and BLIP vision tower (random weights,
the real architectures' cost), from a local HTTP server that serves a Reddit-shaped listing of N image posts
and the images, split by stage, against the original's sequential way in the same run.

    python -m bench.ingest                 # 500 images; the sequential way on 100 of them (~20 minutes)
    python -m bench.ingest --images 60 --subset 20   # a quick look
    python -m bench.ingest --quick         # the tiny models on torch fp32, 16 images and 8: under a minute (the
                                           # method, not the figures)
The last line is the rows as one line of JSON.

Rows, each in its own process on a fresh data dir:
- ``pipelined`` with the chosen engines (default ONNX Runtime int8, the fastest CPU backend, bench.engines):
  listing and downloads in background threads, images decoded as they arrive, batches of 16 spread over
  the embed streams (one per core, one thread each, with ONNX Runtime on a CPU) through both towers, blob
  writes in parallel, one vector upsert per batch.
- ``pipelined, torch fp32`` (with ``--torch-pipelined``): the same pipeline on the original's engines (on
  ``--subset`` images), so the pipeline's share of the gain shows apart from the engines'.
- ``sequential (original way)``: the original's loop on ``--subset`` images: one image at a time, download
  -> decode -> SigLIP image tower -> BLIP vision tower -> write blobs -> upsert, torch fp32, without the
  original's sleep between downloads (which would only widen the gap).
Throughput is images ingested per second of wall time; a stage's seconds are summed over the threads that
ran it (downloads overlap the rest, so stages can sum to more than the wall time).

Fanned out (issue 20): ``--workers 1,2,3`` runs, instead, one row per worker count: that many embed workers
(``imgsearch worker --queue embed``, one thread each) on a fresh Redis, the Pinecone stand-in and a shared
SQLite ledger, and one coordinator (``pipeline.ingest.fanout``) in this process; throughput is from the run's
start to its end (worker start-up excluded). ``--models kit`` uses the trained kit instead of the full-size
towers. Two workers should reach at least 1.8x one on a machine with two free cores.

    python -m bench.ingest --workers 1,2,3 --images 120 --backend torch --precision fp32
    python -m bench.ingest --workers 1,2,3 --images 600 --models kit --backend torch --precision fp32
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import SecretStr

SUBS = {"pics": 0}


def photo(seed: int, size: tuple[int, int] = (800, 600)) -> bytes:
    """A photo-like JPEG (~100 KB): a smooth colour field with fine grain, so decoding costs what a real one does."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (size[1], size[0], 3))
    arr = np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _scratch() -> str | None:
    """Temporary folders under build/ where it exists (the disk the models are on), else the system's."""
    return "build" if Path("build").is_dir() else None


def settings_for(data: Path, models: dict[str, Path], engines: Path, base: str, backend: str, precision: str) -> Any:
    from pipeline.settings import Settings

    return Settings(data_dir=data, siglip_model=str(models["siglip"]), blip_model=str(models["blip"]),
                    engine_backend=backend, engine_precision=precision, engine_dir=engines,
                    reddit_public_url=base, reddit_subreddits=SUBS, reddit_image_hosts=["127.0.0.1"],
                    ingest_allow_networks=["127.0.0.1/32"],  # the stand-in, on loopback
                    ingest_allow_ports=[int(base.rsplit(":", 1)[1])],
                    reddit_max_pages=100, ingest_dedup="phash")


def pipelined(n: int, models: dict[str, Path], engines: Path, backend: str, precision: str) -> dict[str, Any]:
    from engines.registry import load_engines, load_image_engines, prepare_ingest_process
    from pipeline.ingest import RedditSource, run_ingest
    from pipeline.stores import make_blob_store, make_vector_store

    with serving(n) as base, tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        s = settings_for(Path(tmp), models, engines, base, backend, precision)
        prepare_ingest_process(s)
        e = load_engines(s)
        streams = load_image_engines(s, e)
        for image, reranker in streams:  # lazy initialisation is not ingest's cost
            image.encode_images([Image.new("RGB", (64, 64))])
            reranker.vision_features([Image.new("RGB", (64, 64))])
        rep = run_ingest(s, RedditSource(s), e.image, e.reranker, make_vector_store(s), make_blob_store(s),
                         embedders=streams)
    assert rep.ingested == n and not rep.failed, (rep.ingested, rep.failed)
    return {"images": rep.ingested, "embed_streams": len(streams), "wall_s": rep.wall_s, "images_per_s": rep.images_per_s,
            "embed_share": rep.stages["embed"] / rep.wall_s, "stages_s": rep.stages}


def sequential(n: int, models: dict[str, Path], engines: Path) -> dict[str, Any]:
    """The original's loop: list, then for each post download, decode, both towers, write; one at a time."""
    import httpx

    from engines.registry import load_engines
    from pipeline import features as featcodec
    from pipeline.ingest import RedditSource
    from pipeline.ingest.images import prepare
    from pipeline.layout import feature_key, image_key, post_key
    from pipeline.stores import make_blob_store, make_vector_store

    with serving(n) as base, tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        s = settings_for(Path(tmp), models, engines, base, "torch", "fp32")
        e = load_engines(s)
        e.image.encode_images([Image.new("RGB", (64, 64))])
        e.reranker.vision_features([Image.new("RGB", (64, 64))])
        vectors, blobs = make_vector_store(s), make_blob_store(s)
        t = dict.fromkeys(("list", "download", "decode", "embed", "write"), 0.0)
        t0 = time.perf_counter()
        posts = [p for page in RedditSource(s).pages() for p in page.posts]
        t["list"] = time.perf_counter() - t0
        with httpx.Client(timeout=20) as http:
            for p in posts:
                a = time.perf_counter()
                data = http.get(p.url).content
                b = time.perf_counter()
                img = prepare(data, s.fetch.max_pixels)
                c = time.perf_counter()
                vec = e.image.encode_images([img.image])[0]
                feat = e.reranker.vision_features([img.image])[0]
                d = time.perf_counter()
                blobs.put(image_key(p.id, "jpg"), img.jpeg)
                blobs.put(post_key(p.id), json.dumps({"id": p.id, **p.metadata()}).encode())
                blobs.put(feature_key(e.reranker.version, p.id), featcodec.encode(feat))
                vectors.upsert([(p.id, vec, {"title": p.title, "subreddit": p.subreddit})])
                t["download"] += b - a
                t["decode"] += c - b
                t["embed"] += d - c
                t["write"] += time.perf_counter() - d
        wall = time.perf_counter() - t0
    return {"images": len(posts), "wall_s": round(wall, 3), "images_per_s": len(posts) / wall,
            "embed_share": t["embed"] / wall, "stages_s": {k: round(v, 3) for k, v in t.items()}}


def fanned_out(n: int, workers: int, models: dict[str, Path], engines: Path, backend: str, precision: str,
               batch: int, logs: Path, ledger: str = "sqlite") -> dict[str, Any]:
    """One fanned-out run over ``workers`` embed workers (see the module's docstring)."""
    import redis

    from cli import stack
    from pipeline.ingest import RedditSource
    from pipeline.ingest.fanout import run_fanout
    from pipeline.jobs import fleet
    from pipeline.versions import ModelVersions
    from standins.pinecone import PineconeStandIn
    from workers.celery_app import batch_sender

    logs.mkdir(parents=True, exist_ok=True)
    with serving(n) as base, tempfile.TemporaryDirectory(dir=_scratch()) as tmp, PineconeStandIn() as pc:
        port = stack.free_port()
        redis_proc = stack.start_redis(port, Path(tmp) / "redis")
        url = f"redis://127.0.0.1:{port}/0"
        # the shared ledger: one SQLite file (one box), or PostgreSQL (a pool of hosts)
        try:
            pg = stack.start_postgres(stack.free_port(), logs / "postgres.log") if ledger == "postgres" else None
        except BaseException:
            redis_proc.stop()
            raise
        ledger_env = {"IMGSEARCH_LEDGER_URL": pg.url} if pg else {}
        env = {"IMGSEARCH_DATA_DIR": tmp, "IMGSEARCH_SIGLIP_MODEL": str(models["siglip"]),
               "IMGSEARCH_BLIP_MODEL": str(models["blip"]), "IMGSEARCH_ENGINE_BACKEND": backend,
               "IMGSEARCH_ENGINE_PRECISION": precision, "IMGSEARCH_ENGINE_DIR": str(engines),
               "IMGSEARCH_REDIS_URL": url, "IMGSEARCH_TORCH_THREADS": "1", "IMGSEARCH_INGEST_EMBED_STREAMS": "1",
               "IMGSEARCH_VECTOR_STORE": "pinecone", "IMGSEARCH_PINECONE_API_KEY": pc.api_key,
               "IMGSEARCH_PINECONE_HOST": pc.host, "IMGSEARCH_INGEST_FANOUT": "true",
               "IMGSEARCH_INGEST_BATCH_SIZE": str(batch), "IMGSEARCH_WARM_UP": "false",
               "IMGSEARCH_REDDIT_PUBLIC_URL": base, "IMGSEARCH_REDDIT_SUBREDDITS": json.dumps(SUBS),
               "IMGSEARCH_REDDIT_IMAGE_HOSTS": '["127.0.0.1"]', "IMGSEARCH_INGEST_ALLOW_NETWORKS": '["127.0.0.1/32"]',
               "IMGSEARCH_INGEST_ALLOW_PORTS": f"[{base.rsplit(':', 1)[1]}]",
               "IMGSEARCH_REDDIT_MAX_PAGES": "100", "IMGSEARCH_INGEST_DEDUP": "phash", **ledger_env}
        procs: list[stack.Proc] = []
        try:  # whatever fails, every process started here stops
            for i in range(workers):
                procs.append(stack.start_worker(env, logs / f"embed-{workers}-{i}.log", name=f"embed{i}",
                                                queue="embed", pool="threads", concurrency=1))
            r = redis.Redis.from_url(url)
            stack.wait_for(lambda: len(fleet.read(r)) == workers, 600, f"{workers} embed workers")
            beat = fleet.read(r)[0]
            s = settings_for(Path(tmp), models, engines, base, backend, precision).model_copy(update={
                "redis_url": url, "vector_store": "pinecone", "ingest_fanout": True, "ingest_batch_size": batch,
                **({"ledger_url": SecretStr(pg.url)} if pg else {})})
            rep = run_fanout(s, RedditSource(s), batch_sender(s), ModelVersions(beat["siglip"], beat["blip"]))
        finally:
            for proc in procs:
                proc.stop()
            redis_proc.stop()
            if pg:
                pg.stop()
    assert rep.ingested == n and not rep.failed, (rep.ingested, rep.failed)
    return {"images": rep.ingested, "workers": workers, "wall_s": rep.wall_s, "images_per_s": rep.images_per_s}


class serving:
    """The Reddit stand-in with ``n`` image posts (pages of 100) and their photos, on a free loopback port."""

    def __init__(self, n: int) -> None:
        from standins.reddit import RedditStandin, Served, post

        self.st = RedditStandin()
        self.st.files = {f"p{i:04d}.jpg": Served(body=photo(i)) for i in range(n)}
        self.posts = [post(f"p{i:04d}", "", sub="pics", score=100_000 - i) for i in range(n)]

    def __enter__(self) -> str:
        from standins.reddit import serve

        self.server, _ = serve(self.st)
        for d in self.posts:
            d["url"] = d["url_overridden_by_dest"] = self.st.image_url(f"{d['id']}.jpg")
        self.st.listings = {"pics": self.posts}
        return self.st.base

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_process(fn: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, torch fp32, 16 images (8 the sequential way)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--subset", type=int, default=100, help="images for the torch-fp32 and sequential rows")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--torch-pipelined", action="store_true", help="add the pipelined torch-fp32 row")
    ap.add_argument("--build", type=Path, default=Path("build"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workers", default="", help="fanned out: embed worker counts, e.g. 1,2,3 (only these rows)")
    ap.add_argument("--models", choices=("fullsize", "kit"), default="fullsize")
    ap.add_argument("--batch", type=int, default=4, help="fanned out: images per batch task")
    ap.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite",
                    help="fanned out: the shared ledger (PostgreSQL started here on a free port)")
    args = ap.parse_args()
    if args.workers:
        fanout_main(args)
        return

    from engines.export import build_onnx
    from engines.fullsize import make_fullsize_models

    args.build.mkdir(exist_ok=True)
    if args.quick:
        from engines.tiny import make_tiny_models

        models = dict(zip(("siglip", "blip"), make_tiny_models(args.build / "tiny"), strict=True))
        args.images, args.subset, args.backend, args.precision = min(args.images, 16), min(args.subset, 8), "torch", "fp32"
    else:
        models = make_fullsize_models(args.build / "fullsize")
    engines = args.build / "engines"
    if args.backend == "onnxruntime":
        build_onnx(str(models["siglip"]), str(models["blip"]), engines,
                   precisions=("fp32", "int8") if args.precision == "int8" else ("fp32",))
    import torch

    rows = [{"way": f"pipelined, {args.backend} {args.precision}",
             **in_process(pipelined, args.images, models, engines, args.backend, args.precision)}]
    print(json.dumps(rows[-1]), flush=True)
    if args.torch_pipelined and (args.backend, args.precision) != ("torch", "fp32"):
        rows.append({"way": "pipelined, torch fp32", **in_process(pipelined, args.subset, models, engines, "torch", "fp32")})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"way": "sequential (original way), torch fp32", **in_process(sequential, args.subset, models, engines)})
    print(json.dumps(rows[-1]), flush=True)
    base = rows[-1]["images_per_s"]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} CPU threads; " + (
        "the tiny models\n" if args.quick else "full-size random-weight SigLIP 2 B/16-512 image tower + BLIP-large "
        "ViT-L/16-384 vision tower\n"))
    stages = ("list", "download", "decode", "dedup", "embed", "write")
    print("| way | images | images/s | vs sequential | embed share of wall | " + " | ".join(f"{s} s" for s in stages) + " |")
    print("|---" * (5 + len(stages)) + "|")
    for r in rows:
        cells = [f"{r['stages_s'].get(s, 0):.1f}" if s in r["stages_s"] else "-" for s in stages]
        print(f"| {r['way']} | {r['images']} | {r['images_per_s']:.3f} | {r['images_per_s'] / base:.2f}x | "
              f"{r['embed_share']:.0%} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows))


def fanout_main(args: argparse.Namespace) -> None:
    from engines.export import build_onnx

    args.build.mkdir(exist_ok=True)
    if args.models == "kit":
        from engines.kit import KIT_DIR

        models = {"siglip": KIT_DIR / "siglip", "blip": KIT_DIR / "blip"}
    else:
        from engines.fullsize import make_fullsize_models

        models = make_fullsize_models(args.build / "fullsize")
    engines = args.build / f"engines-{args.models}"
    if args.backend == "onnxruntime":
        build_onnx(str(models["siglip"]), str(models["blip"]), engines,
                   precisions=("fp32", "int8") if args.precision == "int8" else ("fp32",))
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        rows.append({"way": f"fanned out, {args.models} {args.backend} {args.precision}",
                     **fanned_out(args.images, w, models, engines, args.backend, args.precision, args.batch,
                                  args.build / "logs", args.ledger)})
        print(json.dumps(rows[-1]), flush=True)
    one = rows[0]["images_per_s"] * 1 / rows[0]["workers"]
    print(f"\n{args.models} models, {args.backend} {args.precision}, one thread per worker, batches of {args.batch}, "
          f"{args.ledger} ledger\n")
    print("| embed workers | images | wall s | images/s | vs one worker |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s']:.3f} | "
              f"{r['images_per_s'] / one:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

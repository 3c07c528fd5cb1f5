"""The demo: everything on loopback, on models and images made here, queries through Redis and a worker."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import typer

from cli import stack


def prepare(data_dir: Path, n_images: int) -> tuple[dict[str, str], list[str]]:
    """Models, images and an ingested store under ``data_dir``; returns the environment that points at them
    and example queries. With the trained kit (the default), the images are scenes of its generated world
    that training never saw, and the queries describe some of them in other words than their titles."""
    from engines.kit import KIT_DIR

    kit = (KIT_DIR / "blip" / "config.json").is_file()
    # one store per model set: vectors of another encoder (another width) can't share an index
    data_dir = data_dir / ("kit" if kit else "tiny")
    img_dir = data_dir / "images"
    if kit:
        from engines.kit.world import make_split, write_images

        siglip, blip = KIT_DIR / "siglip", KIT_DIR / "blip"
        items = make_split(n_images, held_out=True, seed=5, unique=True)
        if not img_dir.is_dir():
            write_images(img_dir, items)
        queries = [it.scene.captions()[2] for it in items[:3]]
    else:  # a checkout without the kit: random-weight models rank at random, but the whole path runs
        from engines.tiny import make_tiny_models
        from pipeline.demo_data import write_demo_images

        siglip, blip = data_dir / "models" / "siglip", data_dir / "models" / "blip"
        if not (blip / "config.json").is_file():
            typer.echo(f"making tiny random-weight models in {siglip.parent}")
            make_tiny_models(siglip.parent)
        if not img_dir.is_dir():
            write_demo_images(img_dir, n_images)
        queries = ["a red circle", "a blue square on a white background", "a yellow triangle"]
    # the generated scenes are flat-colour drawings, and some distinct ones look alike at the perceptual hash's
    # thumbnail scale (17 x 16): the demo keeps every one (real photos and memes are not so alike)
    env = {"IMGSEARCH_DATA_DIR": str(data_dir), "IMGSEARCH_SIGLIP_MODEL": str(siglip),
           "IMGSEARCH_BLIP_MODEL": str(blip), "IMGSEARCH_INGEST_DEDUP": "off"}
    os.environ.update(env)
    from engines.registry import load_engines
    from pipeline.ingest import ingest_folder
    from pipeline.settings import get_settings
    from pipeline.stores import make_blob_store, make_vector_store

    get_settings.cache_clear()
    s = get_settings()
    e = load_engines(s)
    vectors = make_vector_store(s)
    rep = ingest_folder(s, img_dir, e.image, e.reranker, vectors, make_blob_store(s))
    typer.echo(f"ingest: {rep.ingested} new, {rep.skipped} already there, {len(rep.failed)} failed")
    close = getattr(vectors, "close", None)
    if callable(close):
        close()
    return env, queries


def query(base: str, text: str, timeout: float = 60.0) -> dict:
    r = httpx.post(f"{base}/v1/jobs", json={"query": text, "limit": 5}, timeout=10)
    r.raise_for_status()
    job_url = base + r.json()["links"]["self"]
    job: dict = {}

    def finished() -> bool:
        nonlocal job
        job = httpx.get(job_url, timeout=10).json()
        return job["status"] in ("done", "failed")

    stack.wait_for(finished, timeout, f"job for {text!r}", interval=0.02)
    return job


def run(*, port: int, n_images: int, data_dir: Path, once: bool, queries: Sequence[str] = ()) -> int:
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env, examples = prepare(data_dir, n_images)
    queries = list(queries) or examples
    procs: list[stack.Proc] = []
    try:
        redis_url = os.environ.get("IMGSEARCH_REDIS_URL") or os.environ.get("REDIS_URL")
        if redis_url:
            if not stack.redis_alive(redis_url):
                typer.echo(f"Redis at {redis_url} does not answer", err=True)
                return 2
        else:
            rport = stack.free_port()
            procs.append(stack.start_redis(rport, data_dir / "redis", logs / "redis.log"))
            redis_url = f"redis://127.0.0.1:{rport}/0"
        env["IMGSEARCH_REDIS_URL"] = redis_url
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                typer.echo(f"port {port} is taken; using a free one (choose with --port)")
                port = stack.free_port()
        except OSError:
            pass
        procs.append(stack.start_worker(env, logs / "worker.log"))
        procs.append(stack.start_api(env, port, logs / "api.log"))
        base = f"http://127.0.0.1:{port}"
        stack.wait_for(lambda: stack.api_ready(base) or not all(p.alive() for p in procs), 120,
                       "the API and a worker with engines loaded", interval=0.2)
        if not all(p.alive() for p in procs):
            typer.echo(f"a process exited at start; see the logs in {logs}", err=True)
            return 1
        for text in queries:
            job = query(base, text)
            if job["status"] != "done":
                typer.echo(f"{text!r}: {job['status']} {job.get('error')}")
                continue
            t = job["timings"]
            typer.echo(f"\nquery {text!r} -> job {job['id']} "
                       f"(total {t['total']:.1f} ms: " + ", ".join(f"{k} {t[k]:.1f}" for k in
                                                                  ("encode", "retrieve", "fetch", "rerank", "fuse")) + ")")
            for i, res in enumerate(job["results"], 1):
                typer.echo(f"  {i}. {res['id']}  score {res['score']:.4f}  itm {res['itm']:.4f}  "
                           f"cos {res['cosine']:.4f}  {res['metadata'].get('title', '')}")
        typer.echo(f"\nAPI at {base}  (docs: {base}/docs)   logs: {logs}")
        typer.echo(f"try: curl -s -X POST {base}/search -H 'content-type: application/json' "
                   f"-d '{{\"query\": \"{queries[0]}\"}}'")
        if not once:
            typer.echo("serving; Ctrl-C to stop")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(0.5) and all(p.alive() for p in procs):
                    pass
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        for p in reversed(procs):
            p.stop()

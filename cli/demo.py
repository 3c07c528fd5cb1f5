"""The demo: everything on loopback, on models and images made here, queries through Redis and a worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import typer

from cli import stack


def quiet_libraries() -> None:
    """The demo prints its own lines only: no faiss loader lines, no transformers progress bars, and no config
    warnings about the kit's token ids (its SigLIP keeps the original's special-token ids over a smaller
    vocabulary, which nothing uses: the tokenizer pads and ends with its own)."""
    import logging

    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
    from engines.registry import load_engines
    from pipeline.ingest import ingest_folder
    from pipeline.settings import Settings
    from pipeline.stores import make_blob_store, make_vector_store

    quiet_libraries()
    # this process's settings, given (the children get ``env``): nothing writes os.environ to reach our own code
    s = Settings(data_dir=data_dir, engines={"siglip_model": str(siglip), "blip_model": str(blip)}, ingest_dedup="off")
    e = load_engines(s)
    vectors = make_vector_store(s)
    rep = ingest_folder(s, img_dir, e.image, e.reranker, vectors, make_blob_store(s))
    typer.echo(f"ingest: {rep.ingested} new, {rep.skipped} already there, {len(rep.failed)} failed")
    vectors.close()
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


class Supervisor:
    """The demo's children: the worker and the API are started again when they die (at most ``max_restarts``
    times each in ``window_s``), saying so; a Redis of the demo's own that dies, or a child that keeps dying,
    ends the demo with the reason."""

    def __init__(self, env: dict[str, str], port: int, logs: Path, max_restarts: int = 3,
                 window_s: float = 60.0) -> None:
        self.env, self.port, self.logs = env, port, logs
        self.max_restarts, self.window_s = max_restarts, window_s
        self.redis: stack.Proc | None = None
        self.children: dict[str, stack.Proc] = {}
        self.restarts: dict[str, list[float]] = {"worker": [], "api": []}

    def _start(self, name: str) -> stack.Proc:
        if name == "worker":
            return stack.start_worker(self.env, self.logs / "worker.log")
        return stack.start_api(self.env, self.port, self.logs / "api.log")

    def start(self) -> None:
        for name in ("worker", "api"):
            self.children[name] = self._start(name)

    def procs(self) -> list[stack.Proc]:
        return ([self.redis] if self.redis else []) + list(self.children.values())

    def check(self) -> str | None:
        """Restart what died; the reason the demo cannot go on, or None."""
        if self.redis is not None and not self.redis.alive():
            return f"Redis exited (code {self.redis.popen.returncode}); the demo's jobs lived there. See {self.logs}"
        for name, proc in list(self.children.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts[name] if now - t < self.window_s] + [now]
            self.restarts[name] = recent
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
            if len(recent) > self.max_restarts:
                return (f"the {name} exited ({how}) {len(recent)} times within {self.window_s:g} s; "
                        f"see {self.logs / (name + '.log')}")
            typer.echo(f"the {name} exited ({how}); starting it again ({len(recent)} of {self.max_restarts})")
            proc.stop(timeout=2)
            self.children[name] = self._start(name)
        return None

    def stop(self) -> None:
        """The API and the worker told to stop at once (their shutdowns overlap: one after the other they could
        outlast a caller's patience, and a caller that then kills the demo leaves Redis behind), then Redis."""
        children = [p for p in self.children.values() if p.alive()]
        for p in children:
            p.signal_group(signal.SIGTERM)
        for p in children:
            p.stop()
        if self.redis is not None:
            self.redis.stop()


def run(*, port: int, n_images: int, data_dir: Path, once: bool, queries: Sequence[str] = ()) -> int:
    """The demo, start to end; the exit status: 0 after Ctrl-C or --once, 1 if it could not go on, 2 if it
    could not start."""
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env, examples = prepare(data_dir, n_images)
    queries = list(queries) or examples
    redis_url = os.environ.get("IMGSEARCH_REDIS_URL") or os.environ.get("REDIS_URL")
    if redis_url and not stack.redis_alive(redis_url, os.environ.get("IMGSEARCH_REDIS_SENTINEL_PASSWORD")):
        from pipeline.redisconn import redacted

        typer.echo(f"Redis at {redacted(redis_url)} does not answer", err=True)
        return 2
    try:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            typer.echo(f"port {port} is taken; using a free one (choose with --port)")
            port = stack.free_port()
    except OSError:
        pass
    sup = Supervisor(env, port, logs)
    # From here on Ctrl-C and SIGTERM, whenever they come (starting up, running the example queries, serving), unwind
    # to the `finally` below, which stops everything started. Both are set here rather than left to Python: a SIGTERM
    # would end the demo at once and leave its Redis, worker and API running, and a shell starts a background job
    # with SIGINT ignored, which Python then keeps.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    try:
        if not redis_url:
            rport = stack.free_port()
            sup.redis = stack.start_redis(rport, data_dir / "redis", logs / "redis.log")
            redis_url = f"redis://127.0.0.1:{rport}/0"
        env["IMGSEARCH_REDIS_URL"] = redis_url
        sup.start()
        base = f"http://127.0.0.1:{port}"
        stack.wait_for(lambda: stack.api_ready(base) or not all(p.alive() for p in sup.procs()), 120,
                       "the API and a worker with engines loaded", interval=0.2)
        if not all(p.alive() for p in sup.procs()):
            typer.echo(f"a process exited at start; see the logs in {logs}", err=True)
            return 1
        for text in queries:
            _show(text, query(base, text))
        typer.echo(f"\nAPI at {base}  (docs: {base}/docs)   logs: {logs}")
        typer.echo(f"try: curl -s -X POST {base}/search -H 'content-type: application/json' "
                   f"-d '{{\"query\": \"{queries[0]}\"}}'")
        if once:
            return 0
        typer.echo("serving; Ctrl-C to stop")
        while True:
            time.sleep(0.5)
            why = sup.check()
            if why is not None:
                typer.echo(f"the demo cannot go on: {why}", err=True)
                return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (_interrupted)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one would cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        sup.stop()


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def _show(text: str, job: dict) -> None:
    if job["status"] != "done":
        typer.echo(f"{text!r}: {job['status']} {job.get('error')}")
        return
    t = job["timings"]
    typer.echo(f"\nquery {text!r} -> job {job['id']} (total {t['total']:.1f} ms: "
               + ", ".join(f"{k} {t[k]:.1f}" for k in ("encode", "retrieve", "fetch", "rerank", "fuse")) + ")")
    for i, res in enumerate(job["results"], 1):
        typer.echo(f"  {i}. {res['id']}  score {res['score']:.4f}  itm {res['itm']:.4f}  "
                   f"cos {res['cosine']:.4f}  {res['metadata'].get('title', '')}")

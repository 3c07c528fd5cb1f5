"""``imgsearch``: the command line (api, worker, search, ingest, models, demo). Heavy imports stay inside
commands, so ``imgsearch api`` never loads torch."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from engines.kit import KIT_DIR  # a path constant: the package's __init__ imports nothing heavy

# no locals in tracebacks: they would print settings, keys and passwords
cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Asynchronous text-to-image search.")
models_cli = typer.Typer(no_args_is_help=True, help="Model folders.")
cli.add_typer(models_cli, name="models")
engines_cli = typer.Typer(no_args_is_help=True, help="Built engines (ONNX Runtime, TensorRT, the compiled torch rerank).")
cli.add_typer(engines_cli, name="engines")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys.")
cli.add_typer(keys_cli, name="keys")


def _logging(s: Any = None) -> None:
    from pipeline import logs
    from pipeline.settings import get_settings

    s = s or get_settings()
    logs.configure(s.log_level, s.log_json)


@cli.command()
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from pipeline.settings import get_api_settings

    _logging(get_api_settings())  # the API's own settings: never Flower's or a worker's
    # proxy_headers off: the app reads X-Forwarded-For itself, from IMGSEARCH_TRUSTED_PROXIES only (uvicorn's own
    # handling would believe it from 127.0.0.1 whatever that setting says)
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_config=None, access_log=False,
                proxy_headers=False)


@cli.command()
def worker(pool: Annotated[str, typer.Option(help="threads (default: IMGSEARCH_WORKER_POOL), prefork or solo")] = "",
           concurrency: Annotated[int, typer.Option(help="jobs at once (default: IMGSEARCH_WORKER_CONCURRENCY)")] = 0,
           name: str = "",
           queue: Annotated[str, typer.Option(help="search (default), ingest or embed (a fanned-out run's batches); "
                                                   "several comma-separated")] = "search",
           health_port: Annotated[int, typer.Option(help="serve GET /healthz here (200 once this host's worker "
                                                         "is warm), for platforms that probe a port")] = 0,
           loglevel: str = "INFO") -> None:
    """Run a worker: engines load once per process; jobs come from the search queue, or ingest runs from the
    ingest queue (give ingest its own workers, so a run never holds one that answers queries)."""
    import os

    # SIGTERM, what a deploy sends, starts Celery's cold shutdown with its soft part (stop consuming, give the
    # jobs in hand IMGSEARCH_WORKER_SOFT_SHUTDOWN_S, hand back the rest) instead of a warm shutdown that waits
    # on them without limit. Celery's process library reads this variable when it is first imported.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from pipeline.settings import get_ingest_settings
    from workers import runtime
    from workers.celery_app import app

    s = get_ingest_settings()  # a worker's own settings (search, embed or ingest): never the API's or Flower's
    _logging(s)
    _preflight(s)
    from pipeline.jobs.queues import queues as queues_of

    queues = queues_of(s)
    names = queue.split(",")
    if not set(names) <= set(queues):
        typer.echo(f"error: --queue must be search, ingest or embed (or several, comma-separated), not {queue!r}",
                   err=True)
        raise typer.Exit(2)
    served = ",".join(queues[n] for n in names)
    runtime.serve(served)  # the heartbeat says which queues this worker serves
    if health_port:
        _serve_health(health_port)
    if "search" not in names:
        from engines.registry import prepare_ingest_process

        prepare_ingest_process(s)  # before the engines load (prefork children inherit it)
    if "auto" in (s.engines.backend, s.engines.precision) and (pool or s.worker_pool) == "prefork" and \
            (concurrency or s.worker_concurrency) > 1:
        # the pool's children would each time the candidates at once, on the same cores: choose once, in a
        # process of its own (this one never loads a model), and they read the cached choice
        import subprocess

        subprocess.run([sys.executable, "-m", "engines.auto"], check=False, stdout=subprocess.DEVNULL)
    try:
        app.worker_main(["worker", "--pool", pool or s.worker_pool, "--concurrency",
                         str(concurrency or s.worker_concurrency), "--queues", served, "--hostname",
                         name or f"{queue.replace(',', '+')}@{s.host}", "--loglevel", loglevel, "--without-mingle",
                         "--without-gossip"])
    finally:  # stopped: no heartbeat of this worker's processes stays behind for /readyz to count
        runtime.shutdown()
        _remove_heartbeats(s)


def _remove_heartbeats(s: Any) -> None:
    import os

    from pipeline.errors import Unavailable
    from pipeline.jobs import fleet
    from pipeline.jobs.store import connect

    try:
        fleet.remove_stopped(connect(s.redis_url, 2, sentinel_password=s.redis_sentinel_password), s.host, os.getpid())
    except Unavailable:
        pass  # Redis away: the keys expire by their TTL


def _worker_healthy() -> bool:
    """A heartbeat from a worker process on this host with its engines loaded (they are warm by then)."""

    from pipeline.errors import Unavailable
    from pipeline.jobs import fleet
    from pipeline.jobs.store import connect
    from pipeline.settings import get_worker_settings

    try:
        s = get_worker_settings()
        r = connect(s.redis_url, 2, sentinel_password=s.redis_sentinel_password)
        return fleet.warm_on_host(fleet.read(r), s.host)
    except (Unavailable, ValueError):
        return False


def _serve_health(port: int) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
            ok = self.path.split("?")[0] == "/healthz" and _worker_healthy()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Health)  # a platform's prober reaches it from outside
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()


def _preflight(s: Any) -> None:
    from engines.check import check_text_layout
    from engines.registry import preflight
    from pipeline.errors import ImgSearchError

    try:
        preflight(s)
        check_text_layout(s.engines.siglip_model, s.engines.text_max_tokens)  # tokenizer files that would give wrong vectors
    except (ImgSearchError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@cli.command()
def ingest(folder: Annotated[Path | None, typer.Argument(help="The folder source's directory.")] = None,
           source: Annotated[str, typer.Option(help="reddit or folder (default: IMGSEARCH_INGEST_SOURCE)")] = "",
           fresh: Annotated[bool, typer.Option(help="Start a new run instead of resuming an unfinished one.")] = False,
           batch_size: Annotated[int, typer.Option()] = 0) -> None:
    """Run one ingest: list the source, download, dedupe, embed and fill the stores, with a progress bar and a
    summary. Idempotent (settled posts are skipped before any download) and resumable after a crash."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engines.registry import load_engines, load_image_engines, prepare_ingest_process
    from pipeline.errors import ImgSearchError
    from pipeline.ingest import make_source, run_ingest
    from pipeline.settings import get_ingest_settings
    from pipeline.stores import make_blob_store, make_vector_store

    s = get_ingest_settings()  # an ingest worker's settings: never the API's or Flower's
    _logging(s)
    if batch_size:
        s = s.model_copy(update={"ingest_batch_size": batch_size})
    name = source or ("folder" if folder is not None else s.ingest_source)
    try:
        src = make_source(s, name, folder)
        prepare_ingest_process(s)
        e = load_engines(s)
        embedders = load_image_engines(s, e)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                      TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task(f"ingest {name}", total=None, counts="")

            def progress(r: Any) -> None:
                bar.update(task, completed=r.ingested + r.duplicates + len(r.failed),
                           counts=f"listed {r.listed} | ingested {r.ingested} | skipped {r.skipped} | "
                                  f"duplicates {r.duplicates}")

            if s.ingest_fanout:  # this process lists and plans; the embed queue's workers do the rest
                from pipeline.ingest.fanout import run_fanout
                from pipeline.versions import ModelVersions
                from workers.celery_app import batch_sender

                rep = run_fanout(s, src, batch_sender(s), ModelVersions.of(e.image, e.reranker), fresh=fresh,
                                 on_progress=progress)
            else:
                rep = run_ingest(s, src, e.image, e.reranker, make_vector_store(s), make_blob_store(s), fresh=fresh,
                                 on_progress=progress, embedders=embedders)
    except ImgSearchError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(rep.summary())
    for what, why in {**rep.source_failures, **rep.failed}.items():
        typer.echo(f"  failed {what}: {why}")


@cli.command()
def delete(post_ids: Annotated[list[str], typer.Argument(help="Post ids to take down.")]) -> None:
    """Take posts down: remove them from the vector store, the blobs and the caches, and keep later ingests
    from bringing them back."""
    _logging()
    from workers.admin import takedown_posts

    for out in takedown_posts(post_ids):
        typer.echo(f"{out['id']}: {out['vectors']} vector(s), blobs {out['blobs'] or 'none'} removed")


@cli.command()
def health(worker: Annotated[bool, typer.Option("--worker", help="this host's worker, not the API")] = False,
           port: int = 8000) -> None:
    """Exit 0 if healthy (for container healthchecks): the API answers /healthz on this host, or a worker on
    this host has a live heartbeat (engines loaded, warm)."""
    import httpx

    if worker:
        ok = _worker_healthy()
    else:
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
    raise typer.Exit(0 if ok else 1)


@cli.command()
def beat(loglevel: str = "INFO") -> None:
    """Run Celery beat: it starts an ingest run on the ingest queue on IMGSEARCH_INGEST_SCHEDULE."""
    from pipeline.settings import get_ingest_settings
    from workers.celery_app import app

    s = get_ingest_settings()
    _logging(s)
    s.ingest_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(loglevel=loglevel, schedule=str(s.ingest_dir / "beat-schedule")).run()


@cli.command()
def flower(port: Annotated[int, typer.Option(help="default IMGSEARCH_FLOWER_PORT (5555)")] = 0,
           address: str = "127.0.0.1") -> None:
    """Serve Flower, the Celery dashboard, against the same broker, behind basic auth from settings."""
    import os

    from pipeline.settings import get_flower_settings

    s = get_flower_settings()
    creds = s.flower_basic_auth.get_secret_value() if s.flower_basic_auth else ""
    user, _, password = creds.partition(":")
    if not user.strip() or not password.strip():  # "user:", ":password", ":" and nothing: Flower would take them
        typer.echo("error: set IMGSEARCH_FLOWER_BASIC_AUTH=user:password, neither of them empty (Flower shows every "
                   "job's arguments)", err=True)
        raise typer.Exit(2)
    # the credentials go by environment, not argv: argv shows in every `ps`
    env = {**os.environ, "FLOWER_BASIC_AUTH": creds}
    os.execvpe(sys.executable, [sys.executable, "-m", "celery", "-A", "workers.celery_app:app", "flower",
                                f"--port={port or s.flower_port}", f"--address={address}"], env)


@keys_cli.command("new")
def keys_new(name: str, admin: bool = False, monitor: bool = False) -> None:
    """Make an API key: prints the key (shown once) and the entry to add to IMGSEARCH_API_KEYS (its hash).
    ``--monitor``: the key may also read /metrics and /readyz's details (for Prometheus; an admin key may too)."""
    import json

    from pipeline.admission.callers import hash_key, new_key

    key = new_key()
    entry: dict[str, object] = {"name": name, "sha256": hash_key(key), "admin": admin}
    if monitor:
        entry["monitor"] = True
    typer.echo(f"key (give it to the client; it is not stored): {key}")
    typer.echo("IMGSEARCH_API_KEYS entry: " + json.dumps(entry))


@engines_cli.command("build")
def engines_build(backend: Annotated[str, typer.Option(help="onnxruntime, tensorrt or torch")] = "onnxruntime",
                  precision: Annotated[str, typer.Option(help="onnxruntime: fp32, int8; tensorrt: fp16, fp32; "
                                                              "torch: fp32, bf16")] = "fp32",
                  force: bool = False) -> None:
    """Export the configured models to ONNX (and int8, or TensorRT plans) under the engine dir; with --backend
    torch, compile the rerank pass for this host instead (engines/compiled.py)."""
    from rich.progress import Progress

    from engines.artifacts import BLIP_COMPONENTS, SIGLIP_COMPONENTS, check_precision
    from engines.build import build_engines, onnx_precisions
    from pipeline.settings import get_settings

    _logging()
    s = get_settings()
    check_precision(backend, precision)
    steps = 1 if backend == "torch" else len(SIGLIP_COMPONENTS + BLIP_COMPONENTS) * len(onnx_precisions(precision))
    with Progress() as bar:
        task = bar.add_task("compiling the rerank pass" if backend == "torch" else "onnx export", total=steps)
        built = build_engines(s, backend, precision, force,
                              progress=lambda what: bar.update(task, advance=1, description=what))
    for path in built:
        typer.echo(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


@engines_cli.command("list")
def engines_list() -> None:
    """List built engines, marking those that belong to the configured models."""
    from engines.blip import SETTING as BLIP_SETTING
    from engines.loading import resolve, version_of
    from engines.siglip import SETTING as SIGLIP_SETTING
    from pipeline.settings import get_settings

    s = get_settings()
    current = set()
    for source, setting in ((s.engines.siglip_model, SIGLIP_SETTING), (s.engines.blip_model, BLIP_SETTING)):
        try:
            current.add(version_of(resolve(source, setting)))
        except Exception:  # a missing model only means nothing is current
            pass
    from engines.artifacts import INT8_RECIPE, REVISIONS, graph_name

    graphs = {graph_name(g) for g in REVISIONS}  # at their current revisions
    root = s.engines_path
    from engines.compiled import is_current

    files = sorted(p for p in root.rglob("*") if p.suffix in (".onnx", ".plan", ".pt2")) if root.is_dir() else []
    if not files:
        typer.echo(f"no engines under {root}; build them with `imgsearch engines build`")
    for p in files:
        version = p.relative_to(root).parts[0]
        old_int8 = ".int8" in p.name and f".int8-{INT8_RECIPE.name}." not in p.name  # another recipe: never served
        if p.suffix == ".pt2":  # a compiled rerank: {graph}.{precision}.aoti-{host}.pt2, current on its own host
            old_graph = p.name.rsplit(".", 3)[0] not in graphs or not is_current(p)
        else:
            old_graph = p.name.rsplit(".", 2)[0] not in graphs  # a graph at an older revision, or no longer used
        mark = "current" if version in current and not old_int8 and not old_graph else "stale"
        typer.echo(f"{mark:8} {p.relative_to(root)}  {p.stat().st_size / 1e6:.1f} MB")


@models_cli.command("tiny")
def models_tiny(folder: Path, seed: int = 0) -> None:
    """Write tiny random-weight SigLIP and BLIP models (real transformers classes) into FOLDER."""
    from engines.tiny import make_tiny_models

    s, b = make_tiny_models(folder, seed=seed)
    typer.echo(f"IMGSEARCH_SIGLIP_MODEL={s}\nIMGSEARCH_BLIP_MODEL={b}")


@models_cli.command("check")
def models_check(source: Annotated[str, typer.Argument(metavar="DIR_OR_HUB_ID", help="A model folder or a hub id.")],
                 load: Annotated[bool, typer.Option(help="Also load the weights and run them, as a worker does.")] = True,
                 max_tokens: Annotated[int, typer.Option(help="SigLIP's query length (IMGSEARCH_TEXT_MAX_TOKENS).")] = 64,
                 engines: Annotated[Path | None, typer.Option(help="Built engines to self-check (default: "
                                                                   "IMGSEARCH_ENGINE_DIR).")] = None,
                 ) -> None:
    """Run a worker's load-time self-checks on a SigLIP or BLIP checkpoint you bring: prints the tokenizer layout,
    the text limits, the version, the parameter counts, the memory it needs, and the int8 self-check of its built
    int8 engines on this CPU; exits 1 where a check fails."""
    from engines.auto import describe_host
    from engines.check import check_model
    from pipeline.settings import get_settings

    report = check_model(source, max_tokens=max_tokens, load=load, engine_dir=engines or get_settings().engines_path)
    typer.echo("\n".join([*report.lines(), describe_host(get_settings())]))
    raise typer.Exit(0 if report.ok else 1)


@models_cli.command("train-kit")
def models_train_kit(out: Path = KIT_DIR, seed: int = 0,
                     siglip_steps: Annotated[int, typer.Option()] = 0, blip_steps: Annotated[int, typer.Option()] = 0,
                     n_train: Annotated[int, typer.Option()] = 0) -> None:
    """Train the model kit (SigLIP + BLIP on the generated world) into OUT, with its manifest and metrics."""
    import dataclasses

    from engines.kit.train import KitConfig, train_kit

    _logging()
    base = KitConfig(seed=seed)
    cfg = dataclasses.replace(base, siglip_steps=siglip_steps or base.siglip_steps,
                              blip_steps=blip_steps or base.blip_steps, n_train=n_train or base.n_train)
    manifest = train_kit(out, cfg, progress=typer.echo)
    typer.echo(f"trained in {manifest['train_s']} s into {out}")


@cli.command("eval")
def eval_kit(models: Path = KIT_DIR, n: int = 500, backend: str = "torch", precision: str = "fp32",
             manifest: Annotated[Path | None, typer.Option(help="Your own folder of images with captions "
                                                                "(manifest.json or manifest.csv: file, caption).")] = None,
             weights: Annotated[str, typer.Option(help="ITM weights to sweep, e.g. 0.5,0.6,0.7,0.8,1.0 "
                                                       "(cosine gets 1 - w); one row each.")] = "") -> None:
    """Retrieval quality of MODELS (the kit by default; a folder with siglip/ and blip/) on the held-out world, or
    on your own captioned images (--manifest): recall@1/5/10 for SigLIP alone and after the BLIP rerank. Any
    backend: ONNX Runtime needs `imgsearch engines build` first."""
    from engines.kit.evaluate import evaluate_gallery, held_out, load_manifest, table
    from engines.registry import load_engines
    from pipeline.settings import get_settings

    s = get_settings().model_copy(update={"engines": {"siglip_model": str(models / "siglip"), "blip_model": str(models / "blip"),
                                                      "backend": backend, "precision": precision}})
    try:
        sweep = [float(w) for w in weights.split(",") if w.strip()]
        gallery = load_manifest(manifest) if manifest is not None else None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    engines = load_engines(s)
    report = evaluate_gallery(engines.image, engines.reranker, gallery or held_out(n), weights=sweep or [s.itm_weight])
    typer.echo(f"{report['gallery']}; {backend} {precision}\n{table(report)}")


@cli.command()
def demo(port: int = 8000, images: int = 48, data_dir: Path = Path("data/demo"),
         once: Annotated[bool, typer.Option(help="Exit after the example queries.")] = False,
         query: Annotated[list[str] | None, typer.Option(help="Your own example queries (repeatable).")] = None) -> None:
    """Make models and images, ingest, start Redis (unless REDIS_URL is set), a worker and the API, run example
    queries through the queue, print the rankings, and serve until Ctrl-C."""
    from cli import demo as demo_mod

    code = demo_mod.run(port=port, n_images=images, data_dir=data_dir, once=once, queries=query or ())
    raise typer.Exit(code)


@cli.command()
def search(query: Annotated[str | None, typer.Argument(help="What the image shows, in words.")] = None,
           like: Annotated[str | None, typer.Option(help="a post id: posts whose images look like it")] = None,
           image: Annotated[Path | None, typer.Option(help="a picture to search by (uploaded to the API)",
                                                      exists=True, dir_okay=False, readable=True)] = None,
           limit: int = 10,
           rerank: Annotated[bool, typer.Option(help="BLIP rerank (--no-rerank: the vector store's order)")] = True,
           api: Annotated[str, typer.Option(help="the API's base URL")] = "http://127.0.0.1:8000",
           key: Annotated[str, typer.Option(envvar="IMGSEARCH_API_KEY", help="an API key, if the API wants one")] = "",
           direct: Annotated[bool, typer.Option(help="search in this process: load the models and open the stores "
                                                     "here, no API, Redis or worker")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="print the job (JSON) instead of the table")] = False,
           explain: Annotated[bool, typer.Option(help="write each result's heatmap overlay (where the reranker "
                                                      "looked) as a PNG file")] = False,
           explain_dir: Annotated[Path, typer.Option(help="where --explain writes its PNG files")] = Path("explain"),
           timeout: Annotated[float, typer.Option(help="seconds to wait for the job")] = 60.0) -> None:
    """Search: submit the query through the API and wait for its job, or run it here with --direct. Prints a
    ranked table (id, score, ITM, cosine, title). The query is words, or --like POST_ID, or --image FILE (the
    score of a search by image is the cosine of BLIP's image projections)."""
    import json

    from pipeline.errors import ImgSearchError

    given = [name for name, v in (("QUERY", query), ("--like", like), ("--image", image)) if v is not None]
    if len(given) != 1:
        typer.echo(f"error: give one of QUERY, --like or --image{' (not ' + ', '.join(given) + ')' if given else ''}",
                   err=True)
        raise typer.Exit(2)
    body: dict[str, Any] = {"limit": limit, "rerank": rerank}
    body.update({"query": query} if query is not None else {"like": like} if like is not None else {})
    try:
        if direct and image is None and like is None:
            job = _search_direct(body, explain_dir if explain else None)
        elif direct:
            raise ImgSearchError("--direct searches by words only; search by image through the API", code="usage")
        else:
            job = _search_api(api, key, body, timeout, image)
            if explain and job.get("status") == "done":
                _overlays_from_api(api, key, job, explain_dir)
    except ImgSearchError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    elif job.get("status") != "done":
        typer.echo(f"job {job.get('id')} {job.get('status')}: {job.get('error')}", err=True)
    else:
        typer.echo(ranked_table(job.get("results") or []))
    raise typer.Exit(0 if job.get("status") == "done" else 1)


def ranked_table(results: list[dict[str, Any]]) -> str:
    """Results as a plain-text table, best first: rank, id, score, ITM, cosine, title."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = [("#", "id", "score", "itm", "cosine", "title")]
    rows += [(str(i), r["id"], num(r.get("score")), num(r.get("itm")), num(r.get("cosine")),
              (r.get("title") or (r.get("metadata") or {}).get("title") or "")[:60]) for i, r in enumerate(results, 1)]
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
                     for row in rows)


def _search_api(base: str, key: str, body: dict[str, Any], timeout: float,
                image: Path | None = None) -> dict[str, Any]:
    """The job, queued through the API and followed until it ended (or ``timeout``); ``image``: uploaded as the
    query (multipart/form-data, the body's other options as JSON beside it)."""
    import json
    import time

    import httpx

    from pipeline.errors import DeadlineExceeded, ImgSearchError, Unavailable

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
            if image is None:
                r = http.post("/v1/jobs", json=body)
            else:
                r = http.post("/v1/jobs", files={"image": (image.name, image.read_bytes())},
                              data={"options": json.dumps(body)}, timeout=60)
            if r.status_code != 202:
                err = r.json().get("error", {}) if "json" in r.headers.get("content-type", "") else {}
                raise ImgSearchError(err.get("message", r.text[:200]), code=err.get("code", f"http_{r.status_code}"))
            url, until = r.json()["links"]["self"], time.monotonic() + timeout
            while time.monotonic() < until:
                job: dict[str, Any] = http.get(url).json()
                if job.get("status") in ("done", "failed"):
                    return job
                time.sleep(0.05)  # polling a job record on loopback: cheap, and the bound is the timeout
    except httpx.HTTPError as exc:
        raise Unavailable(f"the API at {base} does not answer ({type(exc).__name__}); start it with "
                          "`imgsearch api`, or search here with --direct") from None
    raise DeadlineExceeded(f"the job did not end within {timeout:g} s")


def _overlays_from_api(base: str, key: str, job: dict[str, Any], folder: Path) -> None:
    """Each result's overlay from ``GET /v1/jobs/{id}/explain/{post}?format=png``, as ``<rank>-<post id>.png``."""
    import httpx

    from pipeline.errors import ImgSearchError

    folder.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        for rank, r in enumerate(job.get("results") or [], 1):
            resp = http.get(f"/v1/jobs/{job['id']}/explain/{r['id']}", params={"format": "png"})
            if resp.status_code != 200:
                err = resp.json().get("error", {}) if "json" in resp.headers.get("content-type", "") else {}
                raise ImgSearchError(err.get("message", f"HTTP {resp.status_code}"), code=err.get("code", "explain"))
            (folder / f"{rank:02d}-{r['id']}.png").write_bytes(resp.content)


def _search_direct(body: dict[str, Any], explain_dir: Path | None = None) -> dict[str, Any]:
    """The search run in this process, shaped as a job; with ``explain_dir``, each result's overlay written there
    as ``<rank>-<post id>.png`` (pipeline/search/explain.py)."""
    import time

    from engines.registry import load_engines
    from pipeline.search.searcher import Searcher
    from pipeline.settings import get_settings
    from pipeline.stores.bundle import Stores
    from pipeline.types import SearchParams

    _logging()
    s = get_settings()
    _preflight(s)
    engines = load_engines(s)
    t0 = time.time()
    stores = Stores.build(s, caches=False)
    searcher = Searcher.over(s, engines.text, engines.reranker, stores)
    outcome = searcher.search(SearchParams.model_validate(body))
    job = {"id": None, "status": "done", "query": body["query"], "created_at": t0, "finished_at": time.time(),
           "results": [r.model_dump(mode="json") for r in outcome.results], "not_reranked": outcome.not_reranked,
           "timings": outcome.timings}
    if explain_dir is not None and outcome.results:
        from pipeline.layout import image_key
        from pipeline.search.explain import overlay_png
        from pipeline.types import Job

        ids = [r.id for r in outcome.results]
        record = Job(id="direct", status="done", query=body["query"], params=body, created_at=t0,
                     results=outcome.results)
        maps = searcher.explain_posts(record, ids)
        explain_dir.mkdir(parents=True, exist_ok=True)
        for rank, post_id in enumerate(ids, 1):
            image = stores.blobs.get(image_key(post_id, "jpg"))
            if image is not None:
                (explain_dir / f"{rank:02d}-{post_id}.png").write_bytes(overlay_png(image, maps[post_id]))
        job["explain"] = {p: {k: v for k, v in m.items() if k != "grid"} for p, m in maps.items()}
    return job


def _reflow(doc: str) -> str:
    """A docstring as help text: each paragraph one line (the terminal wraps it), paragraphs kept apart."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _clean_help(app: typer.Typer) -> None:
    """Help without the docstrings' hard line breaks; the command list shows each command's first sentence."""
    for info in app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = _reflow(doc)
            info.short_help = info.short_help or info.help.split("\n\n")[0].split(". ")[0].rstrip(".:")
    for group in app.registered_groups:
        if group.typer_instance is not None:
            _clean_help(group.typer_instance)


_clean_help(cli)


def main() -> Any:
    from pydantic import ValidationError

    try:
        return cli()
    except ValidationError as exc:  # settings refused: say which and why, never the values (secrets among them)
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"])
            typer.echo(f"error: settings: {where + ': ' if where else ''}{err['msg']}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

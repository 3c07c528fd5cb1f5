"""``imgsearch``: the command line (api, worker, ingest, models, demo). Heavy imports stay inside commands,
so ``imgsearch api`` never loads torch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Asynchronous text-to-image search.")
models_cli = typer.Typer(no_args_is_help=True, help="Model folders.")
cli.add_typer(models_cli, name="models")


def _logging() -> None:
    from pipeline import logs
    from pipeline.settings import get_settings

    s = get_settings()
    logs.configure(s.log_level, s.log_json)


@cli.command()
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the HTTP API."""
    import uvicorn

    _logging()
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_config=None, access_log=False)


@cli.command()
def worker(pool: str = "prefork", concurrency: Annotated[int, typer.Option()] = 0, name: str = "search@%h",
           loglevel: str = "INFO") -> None:
    """Run a search worker: engines load once per process, jobs come from the search queue."""
    from pipeline.settings import get_settings
    from workers.celery_app import app

    _logging()
    s = get_settings()
    app.worker_main(["worker", "--pool", pool, "--concurrency", str(concurrency or s.worker_concurrency),
                     "--queues", s.search_queue, "--hostname", name, "--loglevel", loglevel, "--without-mingle",
                     "--without-gossip"])


@cli.command()
def ingest(folder: Path, batch_size: int = 16) -> None:
    """Ingest a folder of images (with optional <name>.json or manifest.json metadata) into the stores."""
    from engines.registry import load_engines
    from pipeline.ingest import ingest_folder
    from pipeline.settings import get_settings
    from pipeline.stores import make_blob_store, make_vector_store

    _logging()
    s = get_settings()
    e = load_engines(s)
    rep = ingest_folder(folder, e.image, e.reranker, make_vector_store(s), make_blob_store(s), namespace=s.namespace,
                        batch_size=batch_size)
    typer.echo(f"seen {rep.seen}, ingested {rep.ingested}, skipped {rep.skipped}, failed {len(rep.failed)}; "
               f"time (ms) {rep.timings}")
    for pid, why in rep.failed.items():
        typer.echo(f"  failed {pid}: {why}")


@models_cli.command("tiny")
def models_tiny(folder: Path, seed: int = 0) -> None:
    """Write tiny random-weight SigLIP and BLIP models (real transformers classes) into FOLDER."""
    from engines.tiny import make_tiny_models

    s, b = make_tiny_models(folder, seed=seed)
    typer.echo(f"IMGSEARCH_SIGLIP_MODEL={s}\nIMGSEARCH_BLIP_MODEL={b}")


DEMO_QUERIES = ("a red circle", "a blue square on a white background", "a yellow triangle")


@cli.command()
def demo(port: int = 8000, images: int = 48, data_dir: Path = Path("data/demo"),
         once: Annotated[bool, typer.Option(help="Exit after the example queries.")] = False) -> None:
    """Make models and images, ingest, start Redis (unless REDIS_URL is set), a worker and the API, run example
    queries through the queue, print the rankings, and serve until Ctrl-C."""
    from workers import demo as demo_mod

    code = demo_mod.run(port=port, n_images=images, data_dir=data_dir, once=once, queries=DEMO_QUERIES)
    raise typer.Exit(code)


def main() -> Any:
    return cli()


if __name__ == "__main__":
    sys.exit(main())

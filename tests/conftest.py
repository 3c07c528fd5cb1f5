"""Shared fixtures: tiny models, a generated image set ingested into a store, and a real redis-server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import stack

# the tests decide every setting they use; nothing leaks in from the caller's environment
for _k in [k for k in os.environ if k.startswith("IMGSEARCH_")] + ["REDIS_URL"]:
    os.environ.pop(_k, None)
# torch fp32, not the default `auto`: the tests' figures and parity bounds are fp32's, whatever this CPU would pick
# (a test of `auto` sets it explicitly). Processes the tests start inherit it.
PINNED_ENGINES = {"IMGSEARCH_ENGINE_BACKEND": "torch", "IMGSEARCH_ENGINE_PRECISION": "fp32"}
os.environ.update(PINNED_ENGINES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@dataclass
class Models:
    siglip: Path
    blip: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from engines.tiny import make_tiny_models

    s, b = make_tiny_models(tmp_path_factory.mktemp("models"))
    return Models(s, b)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo_data import write_demo_images

    return write_demo_images(tmp_path_factory.mktemp("images"), 48)


@dataclass
class RedisServer:
    port: int
    workdir: Path
    proc: stack.Proc | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = stack.start_redis(self.port, self.workdir, self.workdir / "redis.log")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(stack.free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class PostgresServer:
    url: str  # the server's own database, for creating others
    server: stack.Postgres

    def database(self, name: str) -> str:
        """A new, empty database named ``name`` (dropped first if a run left it), and its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL server of the tests' own on a free loopback port (the shared ingest ledger)."""
    server = stack.start_postgres(stack.free_port(), tmp_path_factory.mktemp("postgres") / "postgres.log")
    yield PostgresServer(server.url, server)
    server.stop()


def settings_env(data_dir: Path, models: Models, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment a worker or API process of the tests runs with."""
    return {"IMGSEARCH_DATA_DIR": str(data_dir), "IMGSEARCH_SIGLIP_MODEL": str(models.siglip),
            "IMGSEARCH_BLIP_MODEL": str(models.blip), "IMGSEARCH_REDIS_URL": redis_url,
            "IMGSEARCH_TORCH_THREADS": "1", **PINNED_ENGINES,
            # limits are off unless a test turns them on: stacks here submit bursts on purpose
            "IMGSEARCH_RATE_LIMIT_PER_MIN": "0", "IMGSEARCH_MAX_JOBS_IN_FLIGHT": "0", **extra}


def make_settings(data_dir: Path, models: Models, redis_url: str = "redis://127.0.0.1:1/0", **kw: object):  # type: ignore[no-untyped-def]
    from pipeline.settings import Settings

    return Settings(data_dir=data_dir, engines={"siglip_model": str(models.siglip), "blip_model": str(models.blip),
                                                "intra_op_threads": 1},
                    redis_url=redis_url, **{"engine_backend": "torch", "engine_precision": "fp32", **kw})


@pytest.fixture(scope="session")
def engines(tiny_models: Models, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from engines.registry import load_engines

    return load_engines(make_settings(tmp_path_factory.mktemp("unused"), tiny_models))


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: Models, demo_images: Path, engines) -> Path:  # type: ignore[no-untyped-def]
    """A data dir with the 48 demo images ingested (vectors + blobs), shared read-only by the tests."""
    from pipeline.ingest import ingest_folder
    from pipeline.stores import make_blob_store, make_vector_store

    data = tmp_path_factory.mktemp("data")
    # the generated drawings are too alike at thumbnail scale for the perceptual hash (see demo.prepare)
    s = make_settings(data, tiny_models, ingest_dedup="off")
    vectors = make_vector_store(s)
    report = ingest_folder(s, demo_images, engines.image, engines.reranker, vectors, make_blob_store(s))
    assert report.ingested == 48 and not report.failed
    vectors.close()  # type: ignore[attr-defined]
    return data


@pytest.fixture(scope="session")
def pinecone_standin() -> Iterator[object]:
    from standins.pinecone import PineconeStandIn

    with PineconeStandIn() as standin:
        yield standin


@dataclass
class GcsEmulator:
    host: str
    proc: stack.Proc


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """gcp-storage-emulator on a free loopback port; STORAGE_EMULATOR_HOST points the real client at it."""
    import shutil
    import sys

    port = stack.free_port()
    exe = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    proc = stack._spawn("gcs", [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                                "--default-bucket", "imgsearch-test"], None, log)
    host = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import httpx

        try:
            return httpx.get(f"{host}/storage/v1/b", timeout=0.5).status_code < 500
        except httpx.HTTPError:
            return False

    stack.wait_for(up, 30, "the GCS emulator")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    yield GcsEmulator(host, proc)
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    proc.stop()

"""Search quality with the trained model kit, end to end: held-out world images ingested into the stores, and
queries through the API, Redis and a Celery worker must put the right image in the top 5. Fails if the
pipeline, the fusion or a backend breaks ranking."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.kit import KIT_DIR
from engines.kit.world import make_split, write_images
from tests.conftest import Models, make_settings, settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.quality, pytest.mark.integration]
GALLERY, QUERIES = 60, 20


@pytest.fixture(scope="module")
def kit() -> Models:
    return Models(KIT_DIR / "siglip", KIT_DIR / "blip")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, kit: Models) -> tuple[Path, list[str], list[str]]:
    """A data dir with held-out world images ingested; the post ids and one query (another phrasing than the
    post's title) for the first QUERIES of them."""
    from engines.registry import load_engines
    from pipeline.ingest import ingest_folder
    from pipeline.stores import make_blob_store, make_vector_store

    items = make_split(GALLERY, held_out=True, seed=11, unique=True)
    folder = tmp_path_factory.mktemp("world")
    ids = write_images(folder, items)
    data = tmp_path_factory.mktemp("kit-data")
    s = make_settings(data, kit, ingest_dedup="off")  # distinct scenes, some alike at thumbnail scale
    e = load_engines(s)
    vectors = make_vector_store(s)
    report = ingest_folder(s, folder, e.image, e.reranker, vectors, make_blob_store(s))
    assert report.ingested == GALLERY and not report.failed
    vectors.close()  # type: ignore[attr-defined]
    queries = [it.scene.captions()[1 + i % 3] for i, it in enumerate(items[:QUERIES])]
    return data, ids[:QUERIES], queries


@pytest.fixture(scope="module")
def live(redis_server, world, kit, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    running = start_stack(settings_env(world[0], kit, redis_server.url(7)), tmp_path_factory.mktemp("logs"))
    yield running
    running.stop()


def test_right_image_in_top_5_through_the_queue(live: Live, world) -> None:  # type: ignore[no-untyped-def]
    _, ids, queries = world
    misses = []
    for want, q in zip(ids, queries, strict=True):
        job = live.wait(live.submit(q, limit=5))
        assert job["status"] == "done", job
        got = [r["id"] for r in job["results"]]
        if want not in got:
            misses.append((q, want, got))
    assert not misses, misses

"""Search by image with the trained model kit, through the API, Redis and a Celery worker: held-out scenes, each
ingested in two renderings; ``like`` on one rendering must rank the scene's other rendering above every other
scene's, and a new rendering of a scene, uploaded as a PNG (or fetched from its URL), must find the scene's
posts in the top 5."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis

from engines.kit import KIT_DIR
from engines.kit.world import Item, make_split, write_images
from tests.conftest import Models, make_settings, settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.quality, pytest.mark.integration]
SCENES, HELD = 20, 10  # scenes in the gallery (two renderings each); scenes queried by a third rendering


@dataclass
class World:
    data: Path
    scene_of: dict[str, int]  # post id -> scene index
    queries: list[tuple[int, bytes]]  # (scene, PNG of a rendering not in the gallery)


def _png(item: Item) -> bytes:
    buf = io.BytesIO()
    item.image(64).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from engines.registry import load_engines
    from pipeline.ingest import ingest_folder
    from pipeline.stores import make_blob_store, make_vector_store

    kit = Models(KIT_DIR / "siglip", KIT_DIR / "blip")
    scenes = make_split(SCENES, held_out=True, seed=21, unique=True)
    gallery = [Item(it.scene, it.seed + k) for it in scenes for k in (0, 1)]
    folder = tmp_path_factory.mktemp("image-world")
    ids = write_images(folder, gallery, prefix="p")
    data = tmp_path_factory.mktemp("image-data")
    s = make_settings(data, kit, ingest_dedup="off")  # two renderings of a scene are alike on purpose
    e = load_engines(s)
    vectors = make_vector_store(s)
    report = ingest_folder(s, folder, e.image, e.reranker, vectors, make_blob_store(s))
    assert report.ingested == len(gallery) and not report.failed
    vectors.close()  # type: ignore[attr-defined]
    return World(data, {pid: i // 2 for i, pid in enumerate(ids)},
                 [(i, _png(Item(scenes[i].scene, scenes[i].seed + 2))) for i in range(HELD)])


class _Images(BaseHTTPRequestHandler):
    """Serves the queries' PNGs at /<scene>.png (an allowed image host, for image_url)."""

    pngs: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.startswith("/redirect/"):  # to the same server by its address: a host not allowed
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/{self.path[10:]}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.pngs.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host(world: World) -> Iterator[str]:
    _Images.pngs = {f"/{scene}.png": png for scene, png in world.queries}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def live(redis_server, world: World, image_host: str, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    kit = Models(KIT_DIR / "siglip", KIT_DIR / "blip")
    redis.Redis.from_url(redis_server.url(1)).flushdb()
    env = settings_env(world.data, kit, redis_server.url(1), IMGSEARCH_REDDIT_IMAGE_HOSTS='["localhost"]',
                       IMGSEARCH_INGEST_ALLOW_NETWORKS='["127.0.0.1/32", "::1/128"]',
                       IMGSEARCH_INGEST_ALLOW_PORTS=f"[{image_host.rsplit(':', 1)[1]}]")
    running = start_stack(env, tmp_path_factory.mktemp("image-logs"))
    yield running
    running.stop()


def _submit(live: Live, **kw: object) -> dict:
    r = httpx.post(f"{live.base}/v1/jobs", timeout=30, **kw)  # type: ignore[arg-type]
    assert r.status_code == 202, r.text
    job = live.wait(r.json()["id"])
    assert job["status"] == "done", job
    return job


def test_like_ranks_the_same_scene_above_the_rest(live: Live, world: World) -> None:
    by_scene: dict[int, list[str]] = {}
    for pid, scene in world.scene_of.items():
        by_scene.setdefault(scene, []).append(pid)
    misses = []
    for scene in range(HELD):
        post, twin = by_scene[scene]
        job = _submit(live, json={"like": post, "limit": 10})
        got = [r["id"] for r in job["results"]]
        assert post not in got and job["query"] == "" and job["params"]["like"] == post
        top = job["results"][0]
        assert top.get("itm") is None and top["score"] == pytest.approx(top["cosine"])  # no ITM for an image query
        if got[0] != twin:
            misses.append((post, twin, got[:3]))
    assert not misses, misses


def test_like_keeps_filters_paging_and_min_score(live: Live, world: World) -> None:
    post = next(iter(world.scene_of))
    everything = _submit(live, json={"like": post, "limit": 60, "top_k": 60})["results"]
    assert len(everything) == len(world.scene_of) - 1
    page = _submit(live, json={"like": post, "limit": 5, "offset": 5, "top_k": 60})["results"]
    assert [r["id"] for r in page] == [r["id"] for r in everything[5:10]]
    memes = _submit(live, json={"like": post, "limit": 30, "filter": {"subreddit": "memes"}})["results"]
    assert memes and {r["subreddit"] for r in memes} == {"memes"}
    floor = everything[3]["score"]
    kept = _submit(live, json={"like": post, "limit": 60, "top_k": 60, "min_score": floor})["results"]
    assert kept and all(r["score"] >= floor for r in kept) and len(kept) < len(everything)
    unknown = live.wait(httpx.post(f"{live.base}/v1/jobs", json={"like": "no_such_post"}, timeout=10).json()["id"])
    assert unknown["status"] == "failed" and unknown["error"]["code"] == "unknown_post"


def test_an_uploaded_png_finds_its_scene_in_the_top_5(live: Live, world: World) -> None:
    hits = 0
    for scene, png in world.queries:
        job = _submit(live, files={"image": (f"{scene}.png", png, "image/png")}, data={"options": '{"limit": 5}'})
        assert len(job["params"]["image"]) == 64 and job["query"] == ""
        hits += any(world.scene_of[r["id"]] == scene for r in job["results"])
    assert hits >= 9, f"{hits} of {len(world.queries)} scenes found in the top 5"


def test_an_image_url_is_fetched_and_searched_and_metrics_tell_the_kinds_apart(live: Live, world: World, image_host: str) -> None:
    scene, _ = world.queries[0]
    job = _submit(live, json={"image_url": f"{image_host}/{scene}.png", "limit": 5})
    assert job["params"]["image_url"].endswith(f"/{scene}.png")
    assert any(world.scene_of[r["id"]] == scene for r in job["results"])
    redirected = httpx.post(f"{live.base}/v1/jobs", json={"image_url": f"{image_host}/redirect/{scene}.png"},
                            timeout=30)  # every hop is checked again
    assert redirected.status_code == 422 and redirected.json()["error"]["code"] == "url_refused", redirected.text
    _submit(live, json={"like": next(iter(world.scene_of)), "limit": 3})
    text = httpx.get(f"{live.base}/metrics", timeout=10).text  # each kind counted under its own label
    for kind in ("like", "image"):
        assert f'imgsearch_stage_seconds_count{{kind="{kind}",stage="encode"}}' in text
        assert f'imgsearch_jobs_total{{kind="{kind}",outcome="done"}}' in text

"""``GET /v1/jobs/{id}/explain/{post_id}`` through real processes (Redis, a Celery worker, the API): a done text
job's result gets a map (JSON: a grid summing to 1; PNG: the overlay, the stored image's size), a post not in its
results 404, a job that did not end done 409, an image query an explicit "no text-to-image map"."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.live import Live, demo_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    yield from demo_stack(redis_server, store_dir, tiny_models, 13, tmp_path_factory.mktemp("logs"))


def test_explain_a_result(live: Live) -> None:
    job = live.wait(live.submit("a red circle", limit=3))
    assert job["status"] == "done", job
    post = job["results"][0]["id"]
    url = f"{live.base}/v1/jobs/{job['id']}/explain"
    r = httpx.get(f"{url}/{post}", timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    grid = np.asarray(body["grid"])
    assert grid.ndim == 2 and grid.shape[0] == grid.shape[1] and grid.min() >= 0 and abs(grid.sum() - 1) < 1e-3
    assert body["method"] == "gradcam" and isinstance(body["layer"], int)
    png = httpx.get(f"{url}/{post}", params={"format": "png"}, timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    stored = Image.open(io.BytesIO(httpx.get(f"{live.base}/v1/images/{post}", timeout=10).content))
    assert Image.open(io.BytesIO(png.content)).size == stored.size
    explained = live.wait(live.submit("a red circle", limit=3, explain=True))
    assert explained["status"] == "done" and "explain" in explained["timings"]
    first = explained["results"][0]
    assert first["explanation"] == httpx.get(f"{url}/{first['id']}", timeout=60).json()  # the same map either way
    assert "explanation" not in job["results"][0] or job["results"][0]["explanation"] is None
    ranked = {r["id"] for r in job["results"]}
    other = next(p for p in (f"demo{i:03d}" for i in range(100)) if p not in ranked)
    assert httpx.get(f"{url}/{other}", timeout=10).status_code == 404


def _like(live: Live, post: str, **params: object) -> dict:  # type: ignore[type-arg]
    r = httpx.post(f"{live.base}/v1/jobs", json={"like": post, "limit": 3, **params}, timeout=10)
    assert r.status_code == 202, r.text
    return live.wait(r.json()["id"])


def test_not_done_and_image_queries(live: Live) -> None:
    failed = _like(live, "nope9999")
    assert failed["status"] == "failed", failed
    r = httpx.get(f"{live.base}/v1/jobs/{failed['id']}/explain/demo000", timeout=10)
    assert r.status_code == 409, r.text
    like = _like(live, "demo004", explain=True)
    assert all(r["explanation"] == {"available": False, "reason": r["explanation"]["reason"]} for r in like["results"])
    assert like["status"] == "done", like
    url = f"{live.base}/v1/jobs/{like['id']}/explain/{like['results'][0]['id']}"
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200 and r.json()["available"] is False and "no text-to-image" in r.json()["reason"]
    assert httpx.get(url, params={"format": "png"}, timeout=60).status_code == 422

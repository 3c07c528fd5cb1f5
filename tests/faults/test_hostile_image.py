"""Hostile pictures against search by image, through uvicorn as a client on the network sends them: a
decompression bomb, a truncated file, HTML sent as a picture, a 50 MB body, URLs to a host that is not allowed
or to loopback, malformed forms. Each gets a 4xx in the error shape at once (the API checks the picture before
any job exists), and the API and the worker go on serving: a good upload right after each is searched."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
import redis
from PIL import Image

from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.hostile, pytest.mark.faults, pytest.mark.integration]


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    redis.Redis.from_url(redis_server.url(13)).flushdb()
    # localhost is an allowed host here, but no network is let through: its loopback address is refused
    env = settings_env(store_dir, tiny_models, redis_server.url(13),
                       IMGSEARCH_REDDIT_IMAGE_HOSTS='["i.redd.it", "localhost"]')
    running = start_stack(env, tmp_path_factory.mktemp("hostile-image"))
    yield running
    running.stop()


def _png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 1 if mode == "1" else (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _upload(live: Live, data: bytes, name: str = "x.png", options: str = '{"limit": 3}') -> httpx.Response:
    return httpx.post(f"{live.base}/v1/jobs", files={"image": (name, data, "image/png")}, data={"options": options},
                      timeout=60)


def _refused(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def _still_serving(live: Live) -> None:
    """The API answers, and a worker searches a good upload to its end."""
    resp = _upload(live, _png())
    assert resp.status_code == 202, resp.text
    job = live.wait(resp.json()["id"])
    assert job["status"] == "done" and job["results"], job


BOMB = _png((8000, 8000), "1")  # 64 M pixels in a few KB: over IMGSEARCH_INGEST_MAX_PIXELS (40 M)


@pytest.mark.parametrize(("data", "status", "code"), [
    (BOMB, 422, "image_too_large"),
    (_png()[:-40], 422, "bad_image"),  # truncated: the end of its pixel data and IEND cut off
    (b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", 422, "not_an_image"),
    (b"GIF89a" + b"\x00" * 20, 422, "bad_image"),  # a header and nothing behind it
    (b"", 422, "not_an_image"),
], ids=["bomb", "truncated", "html", "gif-header-only", "empty"])
def test_bad_pictures_get_a_4xx_and_nothing_runs(live: Live, data: bytes, status: int, code: str) -> None:
    assert len(BOMB) < 100_000
    _refused(_upload(live, data), status, code)
    _still_serving(live)


def test_a_50_mb_body_is_refused(live: Live) -> None:
    _refused(_upload(live, b"\x89PNG\r\n\x1a\n" + b"\x00" * (50 << 20)), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(800):
            yield b"\x00" * 65536

    resp = httpx.post(f"{live.base}/v1/jobs", content=chunks(), timeout=60,
                      headers={"content-type": "multipart/form-data; boundary=b"})
    _refused(resp, 413, "payload_too_large")
    _still_serving(live)


@pytest.mark.parametrize(("url", "code"), [
    ("http://evil.example/cat.png", "url_refused"),  # not an allowed host
    ("http://localhost:9/cat.png", "url_refused"),  # allowed name, loopback address
    ("http://127.0.0.1:9/cat.png", "url_refused"),
    ("file:///etc/passwd", "url_refused"),
    ("http://user:pw@i.redd.it/cat.png", "url_refused"),
])
def test_urls_to_hosts_not_allowed_or_loopback_are_refused(live: Live, url: str, code: str) -> None:
    _refused(httpx.post(f"{live.base}/v1/jobs", json={"image_url": url}, timeout=30), 422, code)
    _still_serving(live)


@pytest.mark.parametrize(("files", "data"), [
    ({}, {"options": "{}"}),  # no picture
    ({"image": ("x.png", _png(), "image/png")}, {"options": '{"query": "words too"}'}),
    ({"image": ("x.png", _png(), "image/png")}, {"options": "{not json"}),
    ({"image": ("x.png", _png(), "image/png")}, {"other": "field"}),
    ({"image": ("x.png", _png(), "image/png"), "options": ("o.json", b"{}", "application/json")}, {}),
], ids=["no-image", "query-beside-image", "options-not-json", "unknown-part", "options-as-file"])
def test_malformed_forms_get_422(live: Live, files: dict, data: dict) -> None:
    resp = httpx.post(f"{live.base}/v1/jobs", files=files or {"x": ("", b"")}, data=data, timeout=30)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "invalid_request"


def test_json_queries_of_two_kinds_at_once_are_refused(live: Live) -> None:
    for body in ({"query": "a", "like": "demo001"}, {"like": "../etc/passwd"}, {"like": "x", "image_url": "http://i.redd.it/a.png"}):
        _refused(httpx.post(f"{live.base}/v1/jobs", json=body, timeout=10), 422, "invalid_request")
    _refused(httpx.post(f"{live.base}/search", json={"like": "demo001"}, timeout=10), 422, "invalid_request")


def test_a_caller_over_its_rate_limit_gets_429_before_its_picture_is_read(redis_server, store_dir) -> None:  # type: ignore[no-untyped-def]
    """A picture pays its own token before it is fetched or decoded: a bomb from a caller with no tokens left is
    refused as over the limit (429), not as a bomb (422), which would mean it was decoded; and an image_url to
    an unknown host is not looked up."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from pipeline.settings import ApiSettings

    redis.Redis.from_url(redis_server.url(12)).flushdb()
    s = ApiSettings(redis_url=redis_server.url(12), data_dir=store_dir, limits={"rate_limit_per_min": 1, "rate_limit_burst": 1},
                    reaper_interval_s=0)
    with TestClient(create_app(s)) as c:
        assert c.post("/v1/jobs", json={"query": "a red circle"}).status_code == 202  # the one token
        _refused(c.post("/v1/jobs", files={"image": ("b.png", BOMB, "image/png")}), 429, "rate_limited")
        _refused(c.post("/v1/jobs", json={"image_url": "https://i.redd.it/x.png"}), 429, "rate_limited")

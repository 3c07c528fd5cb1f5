"""The API as its users meet it: API keys, rate limits behind proxies, the body cap, images, metrics, request
ids; against a real Redis (no worker: these jobs stay queued)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from cli import stack
from pipeline.admission.callers import hash_key
from pipeline.layout import image_key, thumb_key, thumbs_prefix, tombstone_key
from pipeline.settings import Settings
from pipeline.stores.local_blob import LocalBlobStore

pytestmark = pytest.mark.integration

USER, ADMIN = "isk_user-key-for-tests", "isk_admin-key-for-tests"
KEYS = [{"name": "app", "sha256": hash_key(USER)}, {"name": "ops", "sha256": hash_key(ADMIN), "admin": True}]


def _client(redis_server: Any, db: int, peer: str = "203.0.113.9", **kw: Any) -> TestClient:
    redis.Redis.from_url(redis_server.url(db)).flushdb()
    return TestClient(create_app(Settings(redis_url=redis_server.url(db), **kw)), client=(peer, 40000))


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body  # type: ignore[no-any-return]


def test_keys_when_configured_user_and_admin(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 5, api_keys=KEYS, search_wait_s=0.5) as c:
        resp = c.post("/v1/jobs", json={"query": "x"})
        _error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"].startswith("Bearer")
        _error(c.post("/v1/jobs", json={"query": "x"}, headers={"Authorization": "Bearer isk_nope"}), 401, "unauthorized")
        ok = c.post("/v1/jobs", json={"query": "x"}, headers={"Authorization": f"Bearer {USER}"})
        assert ok.status_code == 202
        assert c.get(ok.json()["links"]["self"], headers={"X-API-Key": USER}).status_code == 200
        _error(c.get(ok.json()["links"]["self"]), 401, "unauthorized")
        _error(c.delete("/v1/admin/posts/p1", headers={"X-API-Key": USER}), 403, "forbidden")
        _error(c.post("/v1/admin/ingest", headers={"X-API-Key": USER}), 403, "forbidden")
        queued = c.post("/v1/admin/ingest", headers={"X-API-Key": ADMIN})
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # health and the page: no key
        # the metrics and readiness's details show the fleet: an admin key's (or a monitor key's) only
        _error(c.get("/metrics"), 401, "unauthorized")
        _error(c.get("/metrics", headers={"X-API-Key": USER}), 403, "forbidden")
        assert c.get("/metrics", headers={"X-API-Key": ADMIN}).status_code == 200
        assert set(c.get("/readyz").json()) == {"ready"} == set(c.get("/readyz", headers={"X-API-Key": USER}).json())
        assert "workers" in c.get("/readyz", headers={"X-API-Key": ADMIN}).json()


def test_admin_routes_are_closed_without_keys(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 5) as c:
        assert c.post("/v1/jobs", json={"query": "x"}).status_code == 202  # open for local use
        body = _error(c.delete("/v1/admin/posts/p1"), 403, "forbidden")
        assert "IMGSEARCH_API_KEYS" in body["error"]["message"]


def test_burst_over_the_limit_gets_429_with_retry_after_per_key(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 6, api_keys=KEYS, rate_limit_per_min=6, rate_limit_burst=3) as c:
        user = {"X-API-Key": USER}
        assert [c.post("/v1/jobs", json={"query": "x"}, headers=user).status_code for _ in range(3)] == [202] * 3
        resp = c.post("/v1/jobs", json={"query": "x"}, headers=user)
        _error(resp, 429, "rate_limited")
        assert 1 <= int(resp.headers["retry-after"]) <= 10  # one token comes back every 10 s
        assert c.post("/v1/jobs", json={"query": "x"}, headers={"X-API-Key": ADMIN}).status_code == 202  # its own bucket


def test_forwarded_for_counts_only_from_trusted_proxies(redis_server) -> None:  # type: ignore[no-untyped-def]
    limits: dict[str, Any] = dict(rate_limit_per_min=6, rate_limit_burst=2, trusted_proxies=["10.0.0.0/8"])
    # an untrusted peer that writes its own X-Forwarded-For still spends its own bucket
    with _client(redis_server, 7, peer="198.51.100.7", **limits) as c:
        codes = [c.post("/v1/jobs", json={"query": "x"}, headers={"X-Forwarded-For": f"192.0.2.{i}"}).status_code
                 for i in range(3)]
        assert codes == [202, 202, 429]
    # behind a trusted proxy, the client is the right-most untrusted address: what a client wrote left of it
    # (a spoof) does not pick the bucket
    with _client(redis_server, 8, peer="10.1.2.3", **limits) as c:
        def send(xff: str) -> int:
            return c.post("/v1/jobs", json={"query": "x"}, headers={"X-Forwarded-For": xff}).status_code

        assert [send("192.0.2.1"), send("192.0.2.1"), send("192.0.2.1")] == [202, 202, 429]
        assert send("192.0.2.2, 10.0.0.9") == 202  # another client, through two of our proxies
        assert send("6.6.6.6, 192.0.2.1") == 429  # 192.0.2.1 again, whatever it put in front


def test_jobs_in_flight_cap_and_body_cap(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 9, max_jobs_in_flight=2, max_body_bytes=1024) as c:
        assert [c.post("/v1/jobs", json={"query": f"q{i}"}).status_code for i in range(2)] == [202, 202]
        _error(c.post("/v1/jobs", json={"query": "third"}), 429, "too_many_jobs")
        _error(c.post("/v1/jobs", json={"query": "x", "filter": {"title": "y" * 2000}}), 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"query": "'
            for _ in range(40):
                yield b"z" * 100
            yield b'"}'

        _error(c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413,
               "payload_too_large")


def test_limits_store_down_keeps_serving_and_readyz_says_so(redis_server) -> None:  # type: ignore[no-untyped-def]
    dead = f"redis://127.0.0.1:{stack.free_port()}/0"
    with _client(redis_server, 10, limits_redis_url=dead, rate_limit_burst=1) as c:
        assert [c.post("/v1/jobs", json={"query": "x"}).status_code for _ in range(3)] == [202] * 3
        ready = c.get("/readyz").json()
        assert ready["limits"].startswith("down") and ready["redis"] == "ok"


def test_request_id_is_echoed_and_recorded_with_the_job(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 11) as c:
        resp = c.post("/v1/jobs", json={"query": "x"}, headers={"X-Request-ID": "req-42"})
        assert resp.headers["x-request-id"] == "req-42"
        raw = redis.Redis.from_url(redis_server.url(11)).get(f"imgsearch:job:{resp.json()['id']}")
        assert json.loads(raw or b"{}")["request_id"] == "req-42"
        assert len(c.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"]) == 32


def test_images_with_thumbnails_and_cache_headers(redis_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (200, 30, 30)).save(buf, format="JPEG")
    LocalBlobStore(tmp_path / "blobs").put(image_key("p1", "jpg"), buf.getvalue())
    with _client(redis_server, 12, data_dir=tmp_path) as c:
        full = c.get("/v1/images/p1")
        assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
        assert full.content == buf.getvalue() and "max-age" in full.headers["cache-control"]
        assert c.get("/v1/images/p1", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
        thumb = c.get("/v1/images/p1?size=128")
        assert Image.open(io.BytesIO(thumb.content)).size == (128, 96) and thumb.headers["etag"] != full.headers["etag"]
        _error(c.get("/v1/images/nope"), 404, "not_found")
        _error(c.get("/v1/images/a.b"), 422, "invalid_request")
        _error(c.get("/v1/images/p1?size=4096"), 422, "invalid_request")


def test_a_thumbnail_written_after_its_takedown_listed_the_folder_is_removed_by_its_writer(redis_server,  # type: ignore[no-untyped-def]
                                                                                           tmp_path: Path) -> None:
    """The race a takedown loses otherwise: the writer made its thumbnail from the image it read before the
    takedown began, and writes it after the takedown wrote its tombstone and listed the post's folder (empty then).
    The writer looks for the tombstone after writing, deletes what it wrote and answers 404."""
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (20, 90, 200)).save(buf, format="JPEG")
    store = LocalBlobStore(tmp_path / "blobs")
    store.put(image_key("p2", "jpg"), buf.getvalue())
    store.put(image_key("p3", "jpg"), buf.getvalue())

    class TakenDownMeanwhile(LocalBlobStore):
        def put(self, key: str, data: bytes) -> None:
            if key == thumb_key("p2", 256):  # the takedown ran between the writer's read and its write
                assert self.keys_under(thumbs_prefix("p2")) == []  # what its listing saw
                super().put(tombstone_key("p2"), b"{}")
            super().put(key, data)

    with _client(redis_server, 12, data_dir=tmp_path) as c:
        c.app.state.blobs = TakenDownMeanwhile(tmp_path / "blobs")
        _error(c.get("/v1/images/p2?size=256"), 404, "not_found")
        assert store.keys_under(thumbs_prefix("p2")) == []
        _error(c.get("/v1/images/p2?size=128"), 404, "not_found")  # the tombstone is seen before any is made
        assert store.keys_under(thumbs_prefix("p2")) == []
        made = c.get("/v1/images/p3?size=256")  # another post's: made and kept
        assert made.status_code == 200 and store.keys_under(thumbs_prefix("p3")) == [thumb_key("p3", 256)]
        assert made.headers["cache-control"] == "public, max-age=60"  # open: a shared cache keeps it a minute


def test_metrics_expose_requests_queue_depth_and_workers(redis_server) -> None:  # type: ignore[no-untyped-def]
    with _client(redis_server, 13) as c:
        c.post("/v1/jobs", json={"query": "x"})
        text = c.get("/metrics").text
        assert 'imgsearch_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
        assert 'imgsearch_queue_depth{queue="search"} 1.0' in text and "imgsearch_workers_live 0.0" in text


def test_explain_only_for_the_jobs_own_key(redis_server) -> None:  # type: ignore[no-untyped-def]
    other = "isk_other-key-for-tests"
    keys = [*KEYS, {"name": "other", "sha256": hash_key(other)}]
    with _client(redis_server, 4, api_keys=keys, search_wait_s=0.5) as c:
        job = c.post("/v1/jobs", json={"query": "x"}, headers={"X-API-Key": USER}).json()["links"]["self"]
        url = f"{job}/explain/p1"
        _error(c.get(url), 401, "unauthorized")
        _error(c.get(url, headers={"X-API-Key": other}), 404, "not_found")  # another key's job: never computed
        _error(c.get(url, headers={"X-API-Key": USER}), 409, "conflict")  # no worker here: still queued
        _error(c.get(url, headers={"X-API-Key": ADMIN}), 409, "conflict")

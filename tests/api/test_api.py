"""The HTTP contract against a real Redis (no worker: these jobs stay queued)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from cli import stack
from pipeline.jobs.commands import parse_events
from pipeline.jobs.keys import events_key
from pipeline.jobs.store import connect
from pipeline.settings import Settings
from tests.conftest import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(Settings(redis_url=redis_server.url(4)))) as c:
        yield c


def _error(resp, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/search"])
@pytest.mark.parametrize("body", [
    {"query": ""}, {"query": "   \n\t"}, {"query": "x" * 513}, {"query": 42}, {"query": None}, {"query": ["a"]},
    {}, {"q": "typo"}, {"query": "ok", "limit": 0}, {"query": "ok", "filter": {"score": {"$regex": "."}}},
])
def test_invalid_queries_get_422(client: TestClient, path: str, body: dict) -> None:
    _error(client.post(path, json=body), 422, "invalid_request")


@pytest.mark.parametrize("raw", [b"{broken json", b"", b"[1, 2]", b"\xff\xfe"])
def test_broken_bodies_get_422(client: TestClient, raw: bytes) -> None:
    _error(client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}), 422, "invalid_request")


def test_query_of_512_chars_is_accepted(client: TestClient) -> None:
    assert client.post("/v1/jobs", json={"query": "é" * 512}).status_code == 202


def test_submit_then_poll_and_stream_history(client: TestClient, redis_server) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/v1/jobs", json={"query": "  a surprised pikachu face  ", "limit": 5})
    assert resp.status_code == 202
    body = resp.json()
    assert body["status"] == "queued" and resp.headers["location"] == body["links"]["self"]
    job = client.get(body["links"]["self"]).json()
    assert job["id"] == body["id"] and job["status"] == "queued" and job["query"] == "a surprised pikachu face"
    assert job["params"] == {"limit": 5}
    r = connect(redis_server.url(4), 5)
    assert [e[1] for e in parse_events(r.xrange(events_key(body["id"])))] == ["queued"]
    # the task sits in the search queue, JSON-encoded, with the job id as its task id
    assert r.llen("search") >= 1


@pytest.mark.parametrize("job_id", ["0" * 32, "nope", "../../etc", "A" * 32])
def test_unknown_jobs_get_404(client: TestClient, job_id: str) -> None:
    _error(client.get(f"/v1/jobs/{job_id}"), 404, "not_found")
    _error(client.get(f"/v1/jobs/{job_id}/events"), 404, "not_found")


def test_unknown_route_and_method(client: TestClient) -> None:
    _error(client.get("/v2/nothing"), 404, "not_found")
    _error(client.delete("/search"), 405, "method_not_allowed")


def test_healthz_and_readyz_without_workers(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] == "ok" and ready.json()["ready"] is False


def test_redis_down_gives_503_not_500_nor_a_hang(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(stack.free_port(), tmp_path)
    server.start()
    try:
        with TestClient(create_app(Settings(redis_url=server.url(0), redis_socket_timeout_s=1))) as c:
            assert c.post("/v1/jobs", json={"query": "before"}).status_code == 202
            server.stop()
            t0 = time.monotonic()
            resp = c.post("/v1/jobs", json={"query": "during"})
            _error(resp, 503, "unavailable")
            assert resp.headers["retry-after"] and time.monotonic() - t0 < 5
            _error(c.get("/v1/jobs/" + "1" * 32), 503, "unavailable")
            _error(c.post("/search", json={"query": "during"}), 503, "unavailable")
            assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
            server.start()
            stack.wait_for(lambda: c.post("/v1/jobs", json={"query": "after"}).status_code == 202, 10,
                           "the API to recover after Redis came back", interval=0.2)
    finally:
        server.stop()

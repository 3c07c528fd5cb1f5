"""Hostile input against the API served by uvicorn, as a client on the network sends it: huge bodies, deeply
nested JSON, bytes that are not UTF-8, control characters, a huge header. Every answer is a 4xx with the
error shape (never a 5xx, never a hang), and the API keeps serving; queries in many scripts and emoji go
through the queue to a worker and come back ranked."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.fixture(scope="module")
def live(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    redis.Redis.from_url(redis_server.url(13)).flushdb()
    running = start_stack(settings_env(store_dir, tiny_models, redis_server.url(13)), tmp_path_factory.mktemp("hostile"))
    yield running
    running.stop()


def _post(live: Live, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    return httpx.post(f"{live.base}/v1/jobs", content=content, timeout=15,
                      headers={"content-type": "application/json", **headers})


def _refused(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and resp.json()["error"]["message"]


def _still_serving(live: Live) -> None:
    assert httpx.post(f"{live.base}/v1/jobs", json={"query": "still here"}, timeout=10).status_code == 202


def test_a_10_mb_body_is_refused_before_it_is_read(live: Live) -> None:
    big = b'{"query": "' + b"a" * (10 << 20) + b'"}'
    _refused(_post(live, big), 413, "payload_too_large")  # with a Content-Length

    def chunks() -> Iterator[bytes]:  # without one: counted as it arrives
        yield b'{"query": "'
        for _ in range(160):
            yield b"a" * 65536
        yield b'"}'

    _refused(_post(live, chunks()), 413, "payload_too_large")
    _still_serving(live)


@pytest.mark.parametrize("body", [
    b"[" * 8000 + b"]" * 8000,  # deeper than the JSON decoder goes
    b'{"query": "x", "filter": ' + b'{"$and": [' * 1000 + b"{}" + b"]}" * 1000 + b"}",
    b'{"query": "x", "filter": ' + b'{"$or": [' * 9 + b'{"a": 1}' + b"]}" * 9 + b"}",  # one level too deep
    b'{"query": "x", "filter": {"a": {"$in": [' + b",".join([b"1"] * 1001) + b"]}}}",
    b'{"query": "x", "limit": 1e999}',
    b'{"query": "x", "limit": true}',
])
def test_nested_and_oversized_structures_are_refused(live: Live, body: bytes) -> None:
    resp = _post(live, body)
    assert resp.status_code in (400, 413, 422), resp.text
    assert set(resp.json()) == {"error"} and resp.json()["error"]["message"]
    _still_serving(live)


@pytest.mark.parametrize("body", [
    b'{"query": "\xff\xfe caf\xe9"}',  # Latin-1 bytes, not UTF-8
    b'{"query": "\xed\xa0\x80"}',  # an encoded surrogate
    b'{"query": "\\ud800"}',  # a lone surrogate escape
    b'{"query": "a\\u0000b"}',  # NUL
    b'{"query": "\\u001b[31mred\\u001b[0m"}',  # a terminal escape sequence
    b'{"query": "a\x01b"}',  # a raw control character inside a JSON string
    b'{"query": "\\u0085next"}',  # a C1 control (leading: Python strips it as white space)
])
def test_bytes_that_are_not_text_are_refused(live: Live, body: bytes) -> None:
    _refused(_post(live, body), 422, "invalid_request")


def test_a_huge_header_gets_a_4xx(live: Live) -> None:
    host, port = live.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * (1 << 20) + b"\r\n\r\n")
        s.settimeout(10)
        try:
            head = s.recv(64)
        except ConnectionResetError:
            head = b""  # the server may also just drop such a connection: no 5xx either way
    assert not head.startswith(b"HTTP/1.1 5"), head
    _still_serving(live)


QUERIES = [
    "一只惊讶的皮卡丘", "قطة تنظر إلى الحاسوب", "एक लाल गोला", "красный круг на белом фоне", "驚いたピカチュウの顔",
    "놀란 피카츄 얼굴", "วงกลมสีแดง", "עיגול אדום", "ένας κόκκινος κύκλος", "😮⚡🐭", "👩‍👩‍👧 family 🇯🇵",
    "e\u0301te\u0301 cafe\u0301", "a red circle\twith a tab\nand a newline", "🔴" * 512, "Z̸̢̛a̷l̶g̵o̴ ̷t̸e̷x̴t̶",
]


def test_queries_in_many_scripts_and_emoji_are_searched(live: Live) -> None:
    jobs = {q: live.submit(q, limit=5) for q in QUERIES}
    for q, job_id in jobs.items():
        job = live.wait(job_id, timeout=60)
        assert job["status"] == "done" and len(job["results"]) == 5, (q, job.get("error"))
        assert job["query"] == q.strip()
    _refused(httpx.post(f"{live.base}/v1/jobs", json={"query": "🔴" * 513}, timeout=10), 422, "invalid_request")

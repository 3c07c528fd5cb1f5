"""An attacker against the API, served by uvicorn over a real Redis with a real worker: event streams that would
hold Redis's connections, callers that pose as other addresses, keys that read others' jobs, thumbnails in every
size, NaN in a body, a page that would run what a post says. Each test asserts what was refused and that nothing
was kept, leaked or held: Redis's blocked clients back to none, no bucket for a spoofed address, no thumbnail for
a refused size, another key's job unread and uncancelled, no traceback in the log.

Three API processes share one Redis and one worker: ``keyed`` (API keys, private images, tight stream caps),
``crowd`` (open, 40 streams, a 6-second stream life) and ``edge`` (keys, public images, trusted proxies, a
one-token bucket)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli import stack
from pipeline.admission.callers import hash_key
from pipeline.jobs.store import JobStore, new_job
from pipeline.settings import Settings
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.faults, pytest.mark.hostile, pytest.mark.integration]

KEY_A, KEY_B, KEY_C, ADMIN = "isk_hostile-a", "isk_hostile-b", "isk_hostile-c", "isk_hostile-admin"
KEYS = json.dumps([{"name": "a", "sha256": hash_key(KEY_A)}, {"name": "b", "sha256": hash_key(KEY_B)},
                   {"name": "c", "sha256": hash_key(KEY_C)}, {"name": "ops", "sha256": hash_key(ADMIN), "admin": True}])
DB = 1
FUTURE = "99999999999999-0"  # a Last-Event-ID past anything the stream holds


@dataclass
class Apis:
    keyed: Live
    crowd: str
    edge: str
    r: redis.Redis
    blobs: Path
    logs: Path
    procs: list[stack.Proc]


@pytest.fixture(scope="module")
def apis(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Apis]:  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("hostile-api") / "data"
    shutil.copytree(store_dir, data)  # thumbnails get written into its blobs
    r = redis.Redis.from_url(redis_server.url(DB), decode_responses=True)
    r.flushdb()
    logs = tmp_path_factory.mktemp("hostile-api-logs")
    # no reaper: the jobs these tests make by hand stay open (nothing sends them)
    base = settings_env(data, tiny_models, redis_server.url(DB), IMGSEARCH_REAPER_INTERVAL_S="0",
                        IMGSEARCH_CACHE_RESULTS_TTL_S="0")
    keyed = start_stack({**base, "IMGSEARCH_API_KEYS": KEYS, "IMGSEARCH_RATE_LIMIT_PER_MIN": "60",
                         "IMGSEARCH_RATE_LIMIT_BURST": "20", "IMGSEARCH_MAX_STREAMS_PER_CALLER": "3",
                         "IMGSEARCH_MAX_STREAMS": "5"}, logs / "keyed")
    procs: list[stack.Proc] = []
    try:
        bases = []
        for name, env in (("crowd", {"IMGSEARCH_MAX_STREAMS": "40", "IMGSEARCH_MAX_STREAMS_PER_CALLER": "100",
                                     "IMGSEARCH_STREAM_MAX_S": "6"}),
                          ("edge", {"IMGSEARCH_API_KEYS": KEYS, "IMGSEARCH_PUBLIC_IMAGES": "true",
                                    "IMGSEARCH_TRUSTED_PROXIES": '["127.0.0.2", "::ffff:127.0.0.3"]',
                                    "IMGSEARCH_RATE_LIMIT_PER_MIN": "1", "IMGSEARCH_RATE_LIMIT_BURST": "1"})):
            port = stack.free_port()
            procs.append(stack.start_api({**base, **env}, port, logs / f"{name}.log"))
            bases.append(f"http://127.0.0.1:{port}")
        for url in bases:
            stack.wait_for(lambda url=url: stack.api_ready(url), 60, f"the API at {url}", interval=0.1)
        yield Apis(keyed, bases[0], bases[1], r, data / "blobs", logs, procs)
    finally:
        for p in procs:
            p.stop()
        keyed.stop()


def _refused(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body  # type: ignore[no-any-return]


def _open_job(r: redis.Redis, owner: str | None) -> str:
    """A queued job that nothing will run (not sent; the reaper is off): its stream stays open."""
    job = new_job(Settings(), "never runs", {}, owner=owner)
    JobStore(r, 600, 64).write(job, ("queued", {"id": job.id}), create=True)
    return job.id


def _blocked_streams(r: redis.Redis) -> int:
    """The API's connections blocked in Redis now (an XREAD waiting for events)."""
    return sum(1 for c in r.client_list() if c.get("name") == "imgsearch-api-streams" and "b" in c["flags"])


async def _open(client: httpx.AsyncClient, stack_: AsyncExitStack, url: str, **headers: str) -> httpx.Response:
    return await stack_.enter_async_context(client.stream("GET", url, headers=headers))


async def _until(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def _no_traceback(apis: Apis) -> None:
    for log in apis.logs.rglob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


# --- event streams ---

def test_a_bad_last_event_id_is_refused_before_streaming_and_logs_nothing(apis: Apis) -> None:
    job = _open_job(apis.r, "key:a")
    url = f"{apis.keyed.base}/v1/jobs/{job}/events"
    for bad in ("abc", "1-2-3", "1-", "99999999999999999999999-0", "0x10-0", "$", "+"):
        _refused(httpx.get(url, headers={"X-API-Key": KEY_A, "Last-Event-ID": bad}, timeout=10), 422,
                 "invalid_request")
    assert not apis.r.exists("imgsearch:limits:streams:key:a")  # no place was taken
    assert _blocked_streams(apis.r) == 0
    _no_traceback(apis)


def test_streams_are_capped_per_caller_and_in_all_and_give_their_places_back(apis: Apis) -> None:
    mine, theirs = _open_job(apis.r, "key:a"), _open_job(apis.r, "key:b")

    async def run() -> None:
        async with httpx.AsyncClient(base_url=apis.keyed.base, timeout=10) as client:
            async with AsyncExitStack() as held:
                for _ in range(3):
                    resp = await _open(client, held, f"/v1/jobs/{mine}/events", **{"X-API-Key": KEY_A})
                    assert resp.status_code == 200
                over = await client.get(f"/v1/jobs/{mine}/events", headers={"X-API-Key": KEY_A})
                _refused(over, 429, "too_many_streams")
                assert int(over.headers["retry-after"]) >= 1
                for _ in range(2):
                    resp = await _open(client, held, f"/v1/jobs/{theirs}/events", **{"X-API-Key": KEY_B})
                    assert resp.status_code == 200
                full = await client.get(f"/v1/jobs/{theirs}/events", headers={"X-API-Key": KEY_B})
                _refused(full, 503, "too_many_streams")  # five on this process: the total cap
                assert int(full.headers["retry-after"]) >= 1
                await _until(lambda: _blocked_streams(apis.r) == 5, 10, "five blocked followers")
                assert apis.r.zcard("imgsearch:limits:streams:key:a") == 3
            # all closed: the places, the counts and Redis's blocked connections are all given back
            await _until(lambda: _blocked_streams(apis.r) == 0, 10, "no blocked follower")
            await _until(lambda: apis.r.zcard("imgsearch:limits:streams:key:a") == 0, 10, "a's streams uncounted")
            assert apis.r.zcard("imgsearch:limits:streams:key:b") == 0
            async with client.stream("GET", f"/v1/jobs/{mine}/events", headers={"X-API-Key": KEY_A}) as again:
                assert again.status_code == 200

    asyncio.run(run())


def test_sixty_streams_of_an_ended_job_end_whatever_id_they_send(apis: Apis) -> None:
    job = httpx.post(f"{apis.crowd}/v1/jobs", json={"query": "a red circle", "limit": 2}, timeout=10).json()["id"]
    stack.wait_for(lambda: httpx.get(f"{apis.crowd}/v1/jobs/{job}", timeout=10).json()["status"] == "done", 60,
                   "the job")
    history = httpx.get(f"{apis.crowd}/v1/jobs/{job}/events", timeout=30).text
    last = re.findall(r"^id: (\S+)$", history, re.M)[-1]

    async def one(client: httpx.AsyncClient, after: str) -> str:
        async with client.stream("GET", f"/v1/jobs/{job}/events", headers={"Last-Event-ID": after}) as resp:
            assert resp.status_code == 200
            return "".join([chunk async for chunk in resp.aiter_text()])

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=apis.crowd, timeout=20) as client:
            bodies: list[str] = []
            for _ in range(2):  # sixty, thirty at a time (the process's cap is 40)
                t0 = time.monotonic()
                bodies += await asyncio.gather(*[one(client, FUTURE if i % 2 else last) for i in range(30)])
                # each ended at once (after one second's wait for events), long before its 6-second life
                assert time.monotonic() - t0 < 4.5
            return bodies

    bodies = asyncio.run(run())
    assert all("event:" not in b for b in bodies)  # nothing after the end, nothing invented
    stack.wait_for(lambda: _blocked_streams(apis.r) == 0, 10, "no blocked follower")


def test_streams_past_the_process_cap_wait_nowhere_and_each_lives_no_longer_than_its_limit(apis: Apis) -> None:
    job = _open_job(apis.r, None)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=apis.crowd, timeout=20,
                                     limits=httpx.Limits(max_connections=100)) as client:
            async with AsyncExitStack() as held:
                t0 = time.monotonic()
                resps = await asyncio.gather(*[_open(client, held, f"/v1/jobs/{job}/events") for _ in range(60)])
                codes = sorted(r.status_code for r in resps)
                assert codes == [200] * 40 + [503] * 20, codes
                # only the streams let in hold a connection: the refused ones wait nowhere
                seen = [_blocked_streams(apis.r) for _ in range(10)]
                assert 0 < max(seen) <= 40, seen
                # every open stream ends by itself after IMGSEARCH_STREAM_MAX_S (6 s), the job still open
                bodies = await asyncio.gather(*[r.aread() for r in resps if r.status_code == 200])
                assert 6 <= time.monotonic() - t0 < 15 and all(b"event: queued" in b for b in bodies)
        await _until(lambda: _blocked_streams(apis.r) == 0, 10, "no blocked follower")

    asyncio.run(run())
    assert json.loads(apis.r.get(f"imgsearch:job:{job}") or "{}")["status"] == "queued"


# --- client addresses ---

def _buckets(apis: Apis) -> set[str]:
    return {k.removeprefix("imgsearch:limits:bucket:") for k in apis.r.scan_iter("imgsearch:limits:bucket:ip:*")}


def _drain(client: httpx.Client, url: str, **headers: str) -> None:
    """Spend the bucket these headers land in (images are public on edge: a keyless caller is its address)."""
    for _ in range(40):
        if client.get(url, headers=headers).status_code == 429:
            return
    raise AssertionError("never limited")


def test_forwarded_for_is_believed_only_from_trusted_proxies_and_parsed_as_addresses(apis: Apis) -> None:
    url = f"{apis.edge}/v1/images/demo000"
    direct = httpx.Client(timeout=10)  # from 127.0.0.1: not a trusted proxy
    proxy = httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    mapped = httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.3"))
    with direct, proxy, mapped:
        # an untrusted peer's X-Forwarded-For is not read (uvicorn's own proxy handling is off): every spoof
        # spends the peer's bucket, and no spoofed address gets one
        _drain(direct, url, **{"X-Forwarded-For": "192.0.2.1"})
        _refused(direct.get(url, headers={"X-Forwarded-For": "192.0.2.99"}), 429, "rate_limited")
        # ports are stripped: one client is one bucket whatever its source port
        _drain(proxy, url, **{"X-Forwarded-For": "203.0.113.5:5678"})
        _refused(proxy.get(url, headers={"X-Forwarded-For": "203.0.113.5:40000"}), 429, "rate_limited")
        # IPv6 counts per /64, with or without brackets and a port
        _drain(proxy, url, **{"X-Forwarded-For": "[2001:db8:1:2::1]:443"})
        _refused(proxy.get(url, headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}), 429, "rate_limited")
        assert proxy.get(url, headers={"X-Forwarded-For": "2001:db8:1:3::1"}).status_code == 200  # the next /64
        # every header line is read: the last line is what our proxy appended; a client's first line is not it
        lines = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2, 203.0.113.7")]
        assert proxy.get(url, headers=lines).status_code == 200
        # garbage falls back to the peer; a v4-mapped client is its IPv4 address, a v4-mapped proxy is trusted
        assert proxy.get(url, headers={"X-Forwarded-For": "not-an-address"}).status_code == 200
        assert mapped.get(url, headers={"X-Forwarded-For": "::ffff:198.51.100.9"}).status_code == 200
        assert direct.post(f"{apis.edge}/v1/jobs", json={"query": "x"}).status_code == 401  # public images only
    assert _buckets(apis) == {"ip:127.0.0.1", "ip:203.0.113.5", "ip:2001:db8:1:2::/64", "ip:2001:db8:1:3::/64",
                              "ip:203.0.113.7", "ip:127.0.0.2", "ip:198.51.100.9"}


# --- jobs belong to their caller ---

def test_a_key_reads_streams_and_cancels_only_its_own_jobs(apis: Apis) -> None:
    base = apis.keyed.base
    job = _open_job(apis.r, "key:a")
    unknown = "0" * 32
    as_b = {"X-API-Key": KEY_B}
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        theirs = httpx.request(method, f"{base}/v1/jobs/{job}{path}", headers=as_b, timeout=10)
        nobody = httpx.request(method, f"{base}/v1/jobs/{unknown}{path}", headers=as_b, timeout=10)
        _refused(theirs, 404, "not_found")
        assert theirs.json()["error"]["message"] == nobody.json()["error"]["message"].replace(unknown, job)
    assert not apis.r.exists(f"imgsearch:job:{job}:cancel")  # b's cancel did nothing
    assert json.loads(apis.r.get(f"imgsearch:job:{job}") or "{}")["status"] == "queued"
    own = httpx.get(f"{base}/v1/jobs/{job}", headers={"X-API-Key": KEY_A}, timeout=10)
    assert own.status_code == 200 and "owner" not in own.json()
    assert httpx.get(f"{base}/v1/jobs/{job}", headers={"X-API-Key": ADMIN}, timeout=10).status_code == 200
    done = httpx.delete(f"{base}/v1/jobs/{job}", headers={"X-API-Key": KEY_A}, timeout=10)
    assert done.status_code == 202 and done.json()["error"]["code"] == "cancelled"


# --- thumbnails ---

def test_thumbnails_come_in_fixed_sizes_made_once_behind_the_keys_and_limited(apis: Apis) -> None:
    base, thumbs = apis.keyed.base, apis.blobs / "thumbs"
    _refused(httpx.get(f"{base}/v1/images/demo001?size=128", timeout=10), 401, "unauthorized")
    for size in ("100", "1024", "16"):
        body = _refused(httpx.get(f"{base}/v1/images/demo001?size={size}", headers={"X-API-Key": KEY_A}, timeout=10),
                        422, "invalid_request")
        assert "128, 256, 512" in body["error"]["message"]
    assert not thumbs.exists()  # nothing made for a refused size (nor for the keyless ask)
    first = httpx.get(f"{base}/v1/images/demo001?size=128", headers={"X-API-Key": KEY_A}, timeout=10)
    kept = thumbs / "demo001" / "128.jpg"
    assert first.status_code == 200 and kept.read_bytes() == first.content
    made = kept.stat().st_mtime_ns
    again = httpx.get(f"{base}/v1/images/demo001?size=128", headers={"X-API-Key": KEY_A}, timeout=10)
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    assert kept.stat().st_mtime_ns == made and "private" in again.headers["cache-control"]  # read, not made again
    # a flood of new thumbnails runs out of tokens (a thumbnail made costs one); the refused one is not made
    with httpx.Client(timeout=10, headers={"X-API-Key": KEY_C}) as c:
        for i in range(48):
            resp = c.get(f"{base}/v1/images/demo{i:03d}?size=512")
            if resp.status_code != 200:
                _refused(resp, 429, "rate_limited")
                assert not (thumbs / f"demo{i:03d}" / "512.jpg").exists()
                break
        else:
            raise AssertionError("48 thumbnails made without a limit")
    assert {p.parent.name for p in thumbs.glob("*/512.jpg")} == {f"demo{j:03d}" for j in range(i)}
    # a post id with a trailing newline is no post id (re.match with $ took it)
    _refused(httpx.get(f"{base}/v1/images/demo001%0A", headers={"X-API-Key": KEY_A}, timeout=10), 422,
             "invalid_request")


# --- the page and the API's headers ---

def test_the_page_runs_only_its_own_script_and_no_answer_can_be_framed_or_sniffed(apis: Apis) -> None:
    page = httpx.get(f"{apis.keyed.base}/", timeout=10)
    csp = page.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    assert scripts
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(js.encode()).digest()).decode()}'" for js in scripts)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == f"'self' {hashes}"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["frame-ancestors"] == "'none'" and directives["default-src"] == "'none'"
    assert "redditLink(" in page.text and "https://www.reddit.com" in page.text  # permalinks as reddit paths only
    for resp in (page, httpx.get(f"{apis.keyed.base}/healthz", timeout=10),
                 httpx.get(f"{apis.keyed.base}/v1/jobs/{'0' * 32}", timeout=10)):
        assert resp.headers["x-content-type-options"] == "nosniff" and resp.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]


# --- JSON bodies ---

@pytest.mark.parametrize("body", [
    b'{"query": "x", "min_score": NaN}',
    b'{"query": "x", "min_score": -Infinity}',
    b'{"query": "x", "filter": {"score": {"$gte": Infinity}}}',
    b'{"query": "x", "filter": {"$or": [{"score": {"$in": [1, NaN]}}]}}',
])
def test_nan_and_infinity_are_refused_at_every_edge(apis: Apis, body: bytes) -> None:
    from api.contract import request_of
    from pipeline.errors import InvalidRequest

    before = len(list(apis.r.scan_iter("imgsearch:job:*")))
    resp = httpx.post(f"{apis.crowd}/v1/jobs", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert "NaN and Infinity" in _refused(resp, 422, "invalid_request")["error"]["message"]
    assert len(list(apis.r.scan_iter("imgsearch:job:*"))) == before  # no job made
    with pytest.raises(InvalidRequest):  # the Cloud Function's and the Modal endpoint's parse (api.contract)
        request_of(json.loads(body))


# --- Flower ---

@pytest.mark.parametrize("creds", ["watch:", ":s3cret-pw", ":", " : "])
def test_flower_refuses_an_empty_user_or_password(creds: str) -> None:
    out = subprocess.run([sys.executable, "-m", "cli.main", "flower", "--port", str(stack.free_port())],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "IMGSEARCH_FLOWER_BASIC_AUTH": creds})
    assert out.returncode == 2 and "IMGSEARCH_FLOWER_BASIC_AUTH" in out.stderr
    assert creds.strip(" :") not in out.stderr + out.stdout or not creds.strip(" :")  # the secret is not echoed

"""Tenants against each other and against the operator, through the real processes (redis-server, a Celery worker,
uvicorn): thumbnails made while their post is taken down, a result cache that would tell one key what another
searched, a large body labelled multipart sent to a route that takes no upload, polling that would cost nothing,
/readyz and /metrics read by anyone, a failed job whose record would show an internal exception.

After each attack: a normal query still runs to its end with its full results (nothing lost), and what the attack
touched is gone or bounded (nothing left behind): no thumbnail of a taken-down post, no cache entry shared, no
dead worker's name, no scan of the keyspace.

Two API processes share one Redis and one worker: ``main`` (keys, public images, a generous limit) and ``tight``
(the same keys, a three-token bucket that refills once a minute)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli import stack
from pipeline.admission.callers import hash_key
from pipeline.settings import Settings
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.faults, pytest.mark.hostile, pytest.mark.integration]

KEY_A, KEY_B, KEY_C, ADMIN, MONITOR = ("isk_tenant-a", "isk_tenant-b", "isk_tenant-c", "isk_tenant-ops",
                                       "isk_tenant-prometheus")
KEYS = json.dumps([{"name": "a", "sha256": hash_key(KEY_A)}, {"name": "b", "sha256": hash_key(KEY_B)},
                   {"name": "c", "sha256": hash_key(KEY_C)},
                   {"name": "ops", "sha256": hash_key(ADMIN), "admin": True},
                   {"name": "prometheus", "sha256": hash_key(MONITOR), "monitor": True}])
DB = 43
STALE = "stale001"  # a post in namespace "stale", embedded by a SigLIP this worker does not hold


@dataclass
class Tenants:
    main: Live
    tight: str
    r: redis.Redis
    data: Path
    logs: Path
    procs: list[stack.Proc]

    @property
    def blobs(self) -> Path:
        return self.data / "blobs"


@pytest.fixture(scope="module")
def tenants(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[Tenants]:  # type: ignore[no-untyped-def]
    from pipeline.stores import make_vector_store

    data = tmp_path_factory.mktemp("hostile-tenants") / "data"
    shutil.copytree(store_dir, data)  # thumbnails are made and posts taken down in it
    vectors = make_vector_store(Settings(data_dir=data))
    (vec, meta), = vectors.fetch(["demo001"]).values()
    vectors.upsert([(STALE, vec, {**meta, "model_version": "siglip-of-another-year"})], namespace="stale")
    vectors.save()
    vectors.close()  # type: ignore[attr-defined]
    r = redis.Redis.from_url(redis_server.url(DB), decode_responses=True)
    r.flushdb()
    logs = tmp_path_factory.mktemp("hostile-tenants-logs")
    base = settings_env(data, tiny_models, redis_server.url(DB), IMGSEARCH_API_KEYS=KEYS, IMGSEARCH_REAPER_INTERVAL_S="0")
    main = start_stack({**base, "IMGSEARCH_PUBLIC_IMAGES": "true", "IMGSEARCH_RATE_LIMIT_PER_MIN": "60000",
                        "IMGSEARCH_RATE_LIMIT_BURST": "1000", "IMGSEARCH_WORKER_CONCURRENCY": "4"}, logs / "main")
    procs: list[stack.Proc] = []
    try:
        port = stack.free_port()
        procs.append(stack.start_api({**base, "IMGSEARCH_RATE_LIMIT_PER_MIN": "1", "IMGSEARCH_RATE_LIMIT_BURST": "3"},
                                     port, logs / "tight.log"))
        tight = f"http://127.0.0.1:{port}"
        stack.wait_for(lambda: stack.api_ready(tight), 60, "the tight API", interval=0.1)
        yield Tenants(main, tight, r, data, logs, procs)
    finally:
        for p in procs:
            p.stop()
        main.stop()


def _usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, resident MiB) of a process now, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), rss / 1024


@pytest.fixture(autouse=True)
def _costs(request: pytest.FixtureRequest, tenants: Tenants) -> Iterator[None]:
    """What each attack cost the API and the worker (CPU seconds, resident MiB after) and left in Redis (keys):
    appended as a JSON line to $ATTACK_COSTS when it is set (the closing note's table)."""
    procs = {"api": tenants.main.procs[-1].pid, "worker": tenants.main.procs[0].pid}
    before = {name: _usage(pid) for name, pid in procs.items()}
    keys, t0 = tenants.r.dbsize(), time.perf_counter()
    yield
    out = os.environ.get("ATTACK_COSTS")
    if out:
        row: dict[str, Any] = {"test": request.node.name, "wall_s": round(time.perf_counter() - t0, 2),
                               "redis_keys_added": tenants.r.dbsize() - keys}
        for name, pid in procs.items():
            cpu, rss = _usage(pid)
            row[f"{name}_cpu_s"], row[f"{name}_rss_mib"] = round(cpu - before[name][0], 2), round(rss)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _refused(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body  # type: ignore[no-any-return]


def _wait(base: str, job_id: str, key: str, timeout: float = 60) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def ended() -> bool:
        nonlocal job
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"X-API-Key": key}, timeout=10).json()
        return job["status"] in ("done", "failed")

    stack.wait_for(ended, timeout, f"job {job_id}", interval=0.05)
    return job


def _search(t: Tenants, query: str, key: str = KEY_A, limit: int = 8) -> dict[str, Any]:
    resp = httpx.post(f"{t.main.base}/v1/jobs", json={"query": query, "limit": limit}, headers={"X-API-Key": key},
                      timeout=10)
    assert resp.status_code == 202, resp.text
    return _wait(t.main.base, resp.json()["id"], key)


def _still_serving(t: Tenants, gone: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """A normal query runs to its end with every result it asked for, none of them a taken-down post."""
    job = _search(t, "a green triangle", KEY_A, limit=12)
    ids = [r["id"] for r in job["results"]]
    assert job["status"] == "done" and len(ids) == 12 and not gone & set(ids), job


# --- takedown ---

def test_a_takedown_leaves_no_thumbnail_of_any_size_even_one_made_while_it_ran(tenants: Tenants) -> None:
    t, base = tenants, tenants.main.base
    posts = [f"demo{i:03d}" for i in range(10, 20)]
    for pid in posts:  # sizes this API never makes (another's settings made them), and the old layout's
        (t.blobs / "thumbs" / pid).mkdir(parents=True, exist_ok=True)
        (t.blobs / "thumbs" / pid / "300.jpg").write_bytes(b"made by an API with other sizes")
        (t.blobs / "thumbs" / "256").mkdir(parents=True, exist_ok=True)
        (t.blobs / "thumbs" / "256" / f"{pid}.jpg").write_bytes(b"kept where thumbnails used to be")
    public = httpx.get(f"{base}/v1/images/demo030?size=128", timeout=10)
    assert public.status_code == 200 and public.headers["cache-control"] == "public, max-age=60"

    done = {pid: threading.Event() for pid in posts}

    def thumbs(pid: str) -> list[int]:
        """Thumbnails of every size, asked again and again until the post's takedown has answered, and once more."""
        codes: list[int] = []
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done[pid].is_set() or not codes or codes[-1] != 404:
                for n in (128, 256, 512):
                    codes.append(c.get(f"/v1/images/{pid}?size={n}").status_code)
                    if n != 512 and not done[pid].is_set():  # a fresh thumbnail each time: the race's window
                        (t.blobs / "thumbs" / pid / f"{n}.jpg").unlink(missing_ok=True)
        return codes

    def take_down(pid: str) -> int:
        try:
            return httpx.delete(f"{base}/v1/admin/posts/{pid}", headers={"X-API-Key": ADMIN}, timeout=60).status_code
        finally:
            done[pid].set()

    with ThreadPoolExecutor(2 * len(posts)) as pool:
        made = [pool.submit(thumbs, pid) for pid in posts]
        downs = [pool.submit(take_down, pid) for pid in posts]
        assert [f.result() for f in downs] == [200] * len(posts)
        codes = [c for f in made for c in f.result()]
    assert set(codes) <= {200, 404} and 404 in codes  # served before, refused after: never an error
    for pid in posts:
        left = [p for p in (t.blobs / "thumbs" / pid).rglob("*") if p.is_file()] if (t.blobs / "thumbs" / pid).exists() else []
        assert left == [], left
        assert not (t.blobs / "thumbs" / "256" / f"{pid}.jpg").exists() and (t.blobs / "gone" / pid).is_file()
        for size in ("", "?size=128", "?size=512"):
            assert httpx.get(f"{base}/v1/images/{pid}{size}", timeout=10).status_code == 404
    assert (t.blobs / "thumbs" / "demo030" / "128.jpg").is_file()  # another post's thumbnail is kept
    _still_serving(t, set(posts))


# --- the result cache ---

def test_the_result_cache_never_tells_one_key_what_another_searched(tenants: Tenants) -> None:
    t = tenants
    entries = len(list(t.r.scan_iter("imgsearch:cache:q:*")))
    first = _search(t, "a blue square", KEY_A)
    again = _search(t, "a blue square", KEY_A)
    assert "result_cache" not in first.get("stats", {}) and again["stats"] == {"result_cache": 1}  # a's own: cached
    theirs = _search(t, "a blue square", KEY_B)
    assert "result_cache" not in theirs.get("stats", {}) and "cache" not in theirs["timings"], theirs
    assert [r["id"] for r in theirs["results"]] == [r["id"] for r in first["results"]]  # the same answer, searched
    assert _search(t, "a blue square", KEY_B)["stats"] == {"result_cache": 1}  # b's own entry now
    assert len(list(t.r.scan_iter("imgsearch:cache:q:*"))) == entries + 2  # one entry per key, none shared
    _still_serving(t)


# --- bodies and limits ---

def test_a_large_body_labelled_multipart_gets_the_json_cap_on_every_route_but_the_upload(tenants: Tenants) -> None:
    t, base = tenants, tenants.main.base
    boundary = "b0undary"
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n').encode()
    body = part + b"\x00" * 980_000 + f"\r\n--{boundary}--\r\n".encode()
    head = {"content-type": f"multipart/form-data; boundary={boundary}", "X-API-Key": ADMIN}
    for path in ("/search", "/v1/admin/ingest", "/v1/jobs/" + "0" * 32 + "/events"):  # refused by its length
        _refused(httpx.post(f"{base}{path}", content=body, headers=head, timeout=30), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once the JSON cap is read
        yield part
        for _ in range(15):
            yield b"\x00" * 65536

    _refused(httpx.post(f"{base}/search", content=chunks(), headers=head, timeout=30), 413, "payload_too_large")
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (300, 200), (30, 160, 60)).save(buf, format="PNG")
    upload = httpx.post(f"{base}/v1/jobs", files={"image": ("x.png", buf.getvalue(), "image/png")},
                        data={"options": '{"limit": 3}'}, headers={"X-API-Key": KEY_A}, timeout=30)
    assert upload.status_code == 202, upload.text  # the upload route keeps its own cap
    assert _wait(base, upload.json()["id"], KEY_A)["status"] == "done"
    _still_serving(t)


def test_polling_and_cancelling_a_job_cost_a_tenth_of_a_token(tenants: Tenants) -> None:
    t = tenants
    head = {"X-API-Key": KEY_C}
    resp = httpx.post(f"{t.tight}/v1/jobs", json={"query": "a yellow circle"}, headers=head, timeout=10)
    assert resp.status_code == 202, resp.text  # one of three tokens: two left, twenty polls' worth
    url = f"{t.tight}/v1/jobs/{resp.json()['id']}"
    polls = 0
    with httpx.Client(timeout=10, headers=head) as c:
        while (got := c.get(url) if polls % 4 else c.delete(url)).status_code in (200, 202, 409):
            polls += 1
            assert polls < 40, "polling is free"
        refused = _refused(got, 429, "rate_limited")
    assert 18 <= polls <= 21 and int(got.headers["retry-after"]) >= 1, (polls, refused)
    _still_serving(t)  # another API process, and key a: served as before


# --- readiness and metrics ---

def test_readyz_and_metrics_show_the_fleet_to_the_operator_only_and_scan_nothing(tenants: Tenants) -> None:
    t, base = tenants, tenants.main.base
    scans = int(t.r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
    t.r.sadd("imgsearch:workers", "ghost-host:4242")  # a worker that died without a word: its key never written
    for head in ({}, {"X-API-Key": KEY_A}, {"X-API-Key": "isk_wrong"}):
        ready = httpx.get(f"{base}/readyz", headers=head, timeout=10)
        assert ready.status_code == 200 and ready.json() == {"ready": True}  # no host, PID or circuit
    _refused(httpx.get(f"{base}/metrics", timeout=10), 401, "unauthorized")
    _refused(httpx.get(f"{base}/metrics", headers={"X-API-Key": KEY_A}, timeout=10), 403, "forbidden")
    full = httpx.get(f"{base}/readyz", headers={"X-API-Key": MONITOR}, timeout=10).json()
    (worker,) = full["workers"]
    assert full["ready"] and worker["pid"] and worker["host"] and "breakers" in worker
    text = httpx.get(f"{base}/metrics", headers={"X-API-Key": MONITOR}, timeout=10).text
    assert "imgsearch_workers_live 1.0" in text
    assert httpx.get(f"{base}/metrics", headers={"X-API-Key": ADMIN}, timeout=10).status_code == 200
    assert t.r.smembers("imgsearch:workers") == {f"{worker['host']}:{worker['pid']}"}  # the ghost is dropped
    after = int(t.r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
    assert after == scans  # no keyspace scan behind either route
    _still_serving(t)


# --- errors ---

def test_a_failed_job_shows_a_stable_code_and_a_safe_message_and_logs_the_rest(tenants: Tenants) -> None:
    """A like query on a post embedded by another SigLIP: the worker refuses it with a message naming models and
    the namespace. Its caller sees the code and a plain sentence; the log has the story, under the job's id."""
    from pipeline.jobs.store import JobStore, new_job
    from workers.celery_app import SEARCH_TASK, client_app, send_job

    t = tenants
    s = Settings(redis_url=t.main.env["IMGSEARCH_REDIS_URL"])
    # and a record whose params are no search (an exception that is none of ours: pydantic's)
    jobs = [new_job(s, "", {"like": STALE, "namespace": "stale"}, owner="key:a"),
            new_job(s, "a cat", {"limit": "a-secret-looking-value"}, owner="key:a")]
    celery = client_app(s)
    try:
        for job in jobs:
            JobStore(t.r, 600, 64).write(job, ("queued", {"id": job.id}), create=True)
            send_job(celery, SEARCH_TASK, job.id, s.search_queue)
    finally:
        celery.close()
    log = (t.logs / "main" / "worker0.log")
    for job, code, exc, detail in ((jobs[0], "model_version_mismatch", "ModelVersionMismatch", "siglip-of-another-year"),
                                   (jobs[1], "search_failed", "ValidationError", "a-secret-looking-value")):
        failed = _wait(t.main.base, job.id, KEY_A)
        assert failed["status"] == "failed" and failed["error"]["code"] == code, failed
        message = failed["error"]["message"]
        for internal in (detail, "stale", "IMGSEARCH_", exc, "Error:", "SearchParams"):
            assert internal not in message, message
        stack.wait_for(lambda job=job, exc=exc: any(job.id in line and exc in line for line in
                                                    log.read_text(errors="replace").splitlines()), 10, "the log line")
        logged = [line for line in log.read_text(errors="replace").splitlines() if job.id in line and exc in line]
        assert detail in "\n".join(logged) or detail in log.read_text(errors="replace"), logged
        events = httpx.get(f"{t.main.base}/v1/jobs/{job.id}/events", headers={"X-API-Key": KEY_A}, timeout=10).text
        assert detail not in events and code in events
    _still_serving(t)

"""The hostile internet against ingest and the stores, through real processes.

Ingest: the ``imgsearch ingest`` command against the Reddit stand-in serving an attacker's listing (ids that
are no ids, a ``javascript:`` permalink, galleries and links to local files, links and redirects to internal
hosts, a drip, a slow host, a Content-Length that lies, a body that never ends). Each entry is refused with its
reason in the ledger; the stand-in's internal server sees no request; nothing of a refused entry is fetched,
read, kept or printed; the run goes on past them, ingests the good posts after them and finishes.

Stores: the Pinecone stand-in answering 400 (a request it calls malformed) to a real worker's queries, through
the real ``pinecone`` client: each job fails with the caller's error code, and the store's circuit stays closed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pipeline.ids import is_post_id, refused_key
from standins.reddit import INTERNAL_HOST, RedditStandin, hostile, running
from tests.conftest import make_settings, settings_env
from tests.live import start_stack

pytestmark = [pytest.mark.faults, pytest.mark.hostile]

DEADLINE_S, MIN_RATE, GRACE_S, CAP = 3.0, 2000, 1.0, 200_000
BAD_IDS = ["..", "x" * 300, "a\x00b"]
REJECTED = {"js1": "not a reddit path", "gf1": "scheme 'file'", "gp1": "no scheme", "fl1": "scheme 'file'"}
REFUSED = {"in1": f"{INTERNAL_HOST}, a loopback address", "rd1": "'metadata.google.internal' is not an allowed",
           "rd2": f"{INTERNAL_HOST}, a loopback address", "rd3": "scheme 'file'", "endless": "too large",
           "liar": "corrupt image"}
SLOW = {"drip": "bytes/s is under", "slow": f"not done within the {DEADLINE_S:g} s deadline"}
GOOD = {"ok1", "ok2"}


@pytest.fixture
def reddit() -> Iterator[RedditStandin]:
    with running() as st:
        yield st


def _env(st: RedditStandin, data: Path, models: Any) -> dict[str, str]:
    return {**settings_env(data, models, "redis://127.0.0.1:1/0"),
            "IMGSEARCH_INGEST_SOURCE": "reddit", "IMGSEARCH_REDDIT_PUBLIC_URL": st.base,
            "IMGSEARCH_REDDIT_SUBREDDITS": json.dumps({"memes": 1000}), "IMGSEARCH_REDDIT_PAGE_SIZE": "4",
            # the internal server's address is an allowed *host* here, so that what refuses it is the address check
            # (as for an allowed name that resolves to an internal address); the allowed network is the stand-in's
            "IMGSEARCH_REDDIT_IMAGE_HOSTS": json.dumps(["127.0.0.1", INTERNAL_HOST]),
            "IMGSEARCH_INGEST_ALLOW_NETWORKS": '["127.0.0.1/32"]',
            # both servers' ports: what refuses the internal one is its address
            "IMGSEARCH_INGEST_ALLOW_PORTS": json.dumps([st.port, st.internal_port]),
            "IMGSEARCH_INGEST_MAX_BYTES": str(CAP), "IMGSEARCH_INGEST_DEADLINE_S": str(DEADLINE_S),
            "IMGSEARCH_INGEST_MIN_BYTES_PER_S": str(MIN_RATE), "IMGSEARCH_INGEST_MIN_RATE_AFTER_S": str(GRACE_S),
            "IMGSEARCH_INGEST_TIMEOUT_S": "2", "IMGSEARCH_INGEST_RETRIES": "1", "IMGSEARCH_INGEST_BATCH_SIZE": "2"}


def _ingest(env: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "cli.main", "ingest"], env={**os.environ, **env}, text=True,
                         capture_output=True, timeout=180)
    log.write_text(out.stdout + out.stderr)
    return out


def _items(ledger: Path) -> dict[str, tuple[str, str, int]]:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2], r[3]) for r in db.execute("SELECT id, status, reason, permanent FROM items")}
    finally:
        db.close()


def test_a_hostile_listing_is_refused_item_by_item_and_nothing_leaks(reddit, tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    hostile(reddit)
    data = tmp_path / "data"
    t0 = time.monotonic()
    out = _ingest(_env(reddit, data, tiny_models), tmp_path / "ingest.log")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    print(f"hostile listing: one run in {took:.1f} s: {out.stdout.strip().splitlines()[0]}")
    items = _items(data / "ingest" / "ledger.sqlite3")

    # what was refused, and why: each entry alone
    for pid in BAD_IDS:
        status, reason, permanent = items[refused_key(pid)]
        assert status == "rejected" and "refused" in reason and permanent, (pid, reason)
        assert "\x00" not in reason and len(reason) < 250
    for pid, why in REJECTED.items():
        assert items[pid][0] == "rejected" and why in items[pid][1], (pid, items[pid])
    for pid, why in REFUSED.items():
        assert items[pid][0] == "failed" and why in items[pid][1] and items[pid][2], (pid, items[pid])
    for pid, why in SLOW.items():  # transient: a later run may try again, up to the attempts allowed
        assert items[pid][0] == "failed" and why in items[pid][1] and not items[pid][2], (pid, items[pid])
    # the run went on past all of them, ingested what came after, and finished
    assert {pid for pid, row in items.items() if row[0] == "ingested"} == GOOD
    assert all(is_post_id(pid) or pid.startswith("refused-id:") for pid in items)
    db = sqlite3.connect(data / "ingest" / "ledger.sqlite3")
    (finished, cursor, report), = db.execute("SELECT finished, cursor, report FROM runs").fetchall()
    assert finished is not None and json.loads(report)["ingested"] == len(GOOD)
    assert json.loads(cursor) == {"sub": None, "after": None}  # checkpointed past the last page

    # nothing fetched that should not be: the internal server saw nothing; refused entries' images, a gallery's
    # other images, and the redirects' targets were never asked for
    assert reddit.internal_requests == []
    for name in ("ok0.jpg", "js1.jpg", "gf1b.jpg", "gp1b.jpg"):
        assert reddit.fetched(name) == [], name
    # a slow host is cut off: the drip once the grace for its rate passed, the slow one at the deadline
    (drip,), (slow,) = reddit.fetched("drip.jpg"), reddit.fetched("slow.jpg")
    assert drip.get("hung_up") and drip["ended"] - drip["t"] < GRACE_S + 2.0, drip
    assert slow.get("hung_up") and DEADLINE_S - 0.5 < slow["ended"] - slow["t"] < DEADLINE_S + 2.5, slow
    endless = reddit.fetched("endless.jpg")
    assert all(r.get("hung_up") for r in endless)  # the cap stopped the read: the host did not finish sending

    # nothing kept: the stores hold the good posts alone, and no file holds what a refused entry pointed at
    s = make_settings(data, tiny_models)
    from pipeline.stores import make_vector_store

    vectors = make_vector_store(s)
    assert vectors.stats()["total_vector_count"] == len(GOOD)
    assert set(vectors.fetch(sorted(GOOD | set(REJECTED) | set(REFUSED) | set(SLOW)))) == GOOD
    secret = Path("/etc/passwd").read_bytes()[:16]
    for path in data.rglob("*"):
        if path.is_file():
            assert path.name.split(".")[0] in GOOD or "blobs" not in path.parts, path
            if "blobs" in path.parts:
                body = path.read_bytes()
                assert secret not in body and b"internal secret" not in body, path
    # nothing leaked to the log: no traceback, no secret
    log = out.stdout + out.stderr
    assert "Traceback" not in log and "root:x" not in log and "internal secret" not in log


def test_a_rerun_records_the_same_refusals_and_fetches_nothing_new(reddit, tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    hostile(reddit)
    reddit.files.pop("slow.jpg")
    reddit.files.pop("drip.jpg")  # 404s, settled for good (a transient failure is retried by later runs)
    data = tmp_path / "data"
    env = _env(reddit, data, tiny_models)
    assert _ingest(env, tmp_path / "first.log").returncode == 0
    first = _items(data / "ingest" / "ledger.sqlite3")
    before = len(reddit.requests)
    again = _ingest(env, tmp_path / "again.log")
    assert again.returncode == 0 and "ingested 0" in again.stdout
    assert [r["path"] for r in reddit.requests[before:] if r["path"].startswith("/i/")] == []
    assert _items(data / "ingest" / "ledger.sqlite3").keys() == first.keys()  # one row per refused entry, still
    assert reddit.internal_requests == []


def test_a_download_ends_by_its_deadline_whatever_the_host_does(reddit, tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    from pipeline.ingest.download import Downloader, FetchError

    hostile(reddit)
    env = _env(reddit, tmp_path, tiny_models)
    s = make_settings(tmp_path, tiny_models, reddit_image_hosts=["127.0.0.1"], ingest_allow_networks=["127.0.0.1/32"],
                      **{k.removeprefix("IMGSEARCH_").lower(): v for k, v in env.items()
                         if k.startswith("IMGSEARCH_INGEST_") and "NETWORKS" not in k and "SOURCE" not in k
                         and "PORTS" not in k}, ingest_allow_ports=[reddit.port, reddit.internal_port])
    downloads = Downloader(s)
    try:
        # the drip is cut by its rate, well before the deadline; the stall host's next bytes would come 0.8 s past
        # the deadline, and the read is cut at the deadline (0.6 s of slack: a loaded machine schedules late)
        for name, why, bound in (("drip.jpg", "bytes/s is under", DEADLINE_S - 0.6),
                                 ("slow.jpg", "deadline", DEADLINE_S), ("stall.jpg", "deadline", DEADLINE_S)):
            t0 = time.monotonic()
            with pytest.raises(FetchError, match=why):
                downloads.fetch(reddit.image_url(name))
            took = time.monotonic() - t0
            print(f"{name}: refused after {took:.2f} s ({why})")
            assert took < bound + 0.6, (name, took)
    finally:
        downloads.close()


@pytest.mark.integration
@pytest.mark.contract
def test_a_store_answering_bad_request_fails_the_job_as_the_callers_and_keeps_its_circuit_closed(  # type: ignore[no-untyped-def]
        redis_server, pinecone_standin, demo_images, tiny_models, engines, tmp_path) -> None:
    from pipeline.ingest import ingest_folder
    from pipeline.stores import make_blob_store, make_vector_store

    data = tmp_path / "data"
    s = make_settings(data, tiny_models, vector_store="pinecone", pinecone_api_key=pinecone_standin.api_key,
                      pinecone_host=pinecone_standin.host, namespace="bad-request", ingest_dedup="off")
    assert ingest_folder(s, demo_images, engines.image, engines.reranker, make_vector_store(s),
                         make_blob_store(s)).ingested == 48
    url = redis_server.url(11)
    redis.Redis.from_url(url).flushdb()
    env = settings_env(data, tiny_models, url, VECTOR_STORE="pinecone", PINECONE_API_KEY=pinecone_standin.api_key,
                       IMGSEARCH_PINECONE_HOST=pinecone_standin.host, IMGSEARCH_NAMESPACE="bad-request",
                       IMGSEARCH_BREAKER_FAILURES="2", IMGSEARCH_HEARTBEAT_TTL_S="2", IMGSEARCH_CACHE_RESULTS_TTL_S="0")
    live = start_stack(env, tmp_path / "logs")
    try:
        refusals = 5  # with the one below, more than enough to open the circuit, were they counted
        pinecone_standin.fail_path["/query"] = [400] * refusals
        for _ in range(refusals):
            job = live.wait(live.submit("a red circle"), timeout=30)
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "vector_store_rejected" and "HTTP 400" in job["error"]["message"], job
        pinecone_standin.fail_path["/query"] = [400]  # the original contract answers the caller's mistake with 422
        r = httpx.post(f"{live.base}/search", json={"query": "a red circle"}, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["code"] == "vector_store_rejected", r.text
        assert pinecone_standin.fail_path["/query"] == []  # every refusal reached the store: none was skipped
        (worker,) = httpx.get(f"{live.base}/readyz", timeout=5).json()["workers"]
        assert worker["breakers"]["vector_store"] == "closed"
        job = live.wait(live.submit("a red circle"), timeout=30)  # and the next one is served at once
        assert job["status"] == "done" and job["results"], job
    finally:
        live.stop()
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert pinecone_standin.api_key not in logs

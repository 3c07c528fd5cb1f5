"""Ingest against a Reddit stand-in on loopback and a folder: the stages, every kind of bad input, idempotent
re-runs, a run killed midway and resumed, takedown, and beat starting runs on a real Celery worker."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from cli import stack
from pipeline.ingest import FolderSource, Ledger, RedditSource, run_ingest
from pipeline.ingest.images import dhash
from pipeline.layout import feature_key, image_key, post_key
from pipeline.search.searcher import Searcher
from pipeline.stores import make_blob_store, make_vector_store
from pipeline.types import SearchParams
from standins.reddit import RedditStandin, Served, gallery, picture, post, running
from tests.conftest import make_settings, settings_env

pytestmark = pytest.mark.ingest

GOOD = {"a1", "a2", "g1", "n1", "gf", "d1", "d2"}
FAILED = {"bad": "corrupt", "zero": "empty", "html": "HTML", "big": "too large", "bomb": "pixels", "gone": "HTTP 404"}
REJECTED = {"rm": "removed", "lk": "not an image post"}


def _gif() -> bytes:
    frames = [Image.open(io.BytesIO(picture(s))).convert("P") for s in (40, 41)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4000, 3000), 128).save(buf, format="PNG")  # 12 Mpx, a few KB
    return buf.getvalue()


def populate(st: RedditStandin) -> None:
    """r/memes (pages of 4, one answered 429 once), r/dankmemes, and r/me_irl that answers 404."""
    files = {"a1.jpg": picture(1), "a2.png": picture(2, fmt="PNG"), "g1a.jpg": picture(3), "g1b.jpg": picture(4),
             "n1.jpg": picture(5), "rm.jpg": picture(6), "d1.jpg": picture(7), "d2.jpg": picture(8), "gf.gif": _gif(),
             "bad.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "zero.jpg": b"",
             "html.jpg": b"<!DOCTYPE html><html><body>Imgur: not found</body></html>", "bomb.png": _bomb(),
             "big.jpg": b"\xff\xd8\xff\xe0" + os.urandom(300_000)}
    dup = Image.open(io.BytesIO(picture(1))).resize((128, 96))
    buf = io.BytesIO()
    dup.save(buf, format="JPEG", quality=70)
    files["dup.jpg"] = buf.getvalue()
    st.files = {name: Served(body=body, content_type="image/png" if name.endswith("png") else "image/jpeg")
                for name, body in files.items()}
    u = st.image_url
    memes = [post("a1", u("a1.jpg")), post("a2", u("a2.png")), gallery("g1", u("g1a.jpg"), u("g1b.jpg")),
             post("n1", u("n1.jpg"), over_18=True), post("rm", u("rm.jpg"), removed_by_category="moderator"),
             post("lk", "https://example.com/story.html"), post("bad", u("bad.jpg")), post("zero", u("zero.jpg")),
             post("html", u("html.jpg")), post("big", u("big.jpg")), post("bomb", u("bomb.png")),
             post("gf", u("gf.gif")), post("dup", u("dup.jpg")), post("gone", u("gone.jpg")),
             post("low", u("a2.png"), score=10)]
    for i, d in enumerate(memes[:-1]):
        d["score"] = 9000 - i  # a top listing comes best first
    st.listings = {"memes": memes, "dankmemes": [post("d1", u("d1.jpg"), sub="dankmemes"),
                                                 post("d2", u("d2.jpg"), sub="dankmemes")]}
    st.missing_subs = {"me_irl"}
    st.throttle_once = {("memes", "t3_n1")}  # the second page


@pytest.fixture
def reddit() -> Iterator[RedditStandin]:
    with running() as st:
        yield st


def reddit_settings(st: RedditStandin, data: Path, models: Any, **kw: Any) -> Any:
    base = dict(reddit_public_url=st.base, reddit_oauth_url=st.base, reddit_token_url=f"{st.base}/api/v1/access_token",
                reddit_subreddits={"memes": 1000, "dankmemes": 1000, "me_irl": 800}, reddit_page_size=4,
                reddit_image_hosts=["127.0.0.1"], ingest_allow_networks=["127.0.0.1/32"],  # the stand-in, on loopback
                ingest_allow_ports=[st.port],
                ingest_max_bytes=200_000, ingest_max_pixels=5_000_000,
                ingest_batch_size=4, ingest_retries=1, reddit_max_wait_s=5)
    return make_settings(data, models, **{**base, **kw})


def reddit_env(st: RedditStandin) -> dict[str, str]:
    return {"IMGSEARCH_REDDIT_PUBLIC_URL": st.base, "IMGSEARCH_REDDIT_OAUTH_URL": st.base,
            "IMGSEARCH_REDDIT_TOKEN_URL": f"{st.base}/api/v1/access_token",
            "IMGSEARCH_REDDIT_SUBREDDITS": json.dumps({"memes": 1000, "dankmemes": 1000}),
            "IMGSEARCH_REDDIT_PAGE_SIZE": "4", "IMGSEARCH_REDDIT_IMAGE_HOSTS": '["127.0.0.1"]',
            "IMGSEARCH_INGEST_ALLOW_NETWORKS": '["127.0.0.1/32"]',  # the stand-in, on loopback
            "IMGSEARCH_INGEST_ALLOW_PORTS": json.dumps([st.port]),
            "IMGSEARCH_INGEST_SOURCE": "reddit"}


def _ingest(s: Any, engines: Any, source: Any = None) -> Any:
    vectors = make_vector_store(s)
    try:
        return run_ingest(s, source or RedditSource(s), engines.image, engines.reranker, vectors, make_blob_store(s))
    finally:
        vectors.close()  # type: ignore[attr-defined]


def test_reddit_ingest_fills_the_stores_and_records_every_failure(reddit, tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    populate(reddit)
    s = reddit_settings(reddit, tmp_path / "data", tiny_models)
    rep = _ingest(s, engines)

    vectors, blobs = make_vector_store(s), make_blob_store(s)
    stored = vectors.fetch(sorted(GOOD | set(FAILED) | set(REJECTED) | {"dup", "low"}))
    assert set(stored) == GOOD and vectors.stats()["total_vector_count"] == len(GOOD)
    assert rep.ingested == len(GOOD) and rep.duplicates == 1 and rep.rejected == len(REJECTED)
    assert set(rep.failed) == set(FAILED)
    for pid, why in FAILED.items():
        assert why in rep.failed[pid], (pid, rep.failed[pid])
    assert "me_irl" in rep.source_failures and "404" in rep.source_failures["me_irl"]
    ledger = Ledger(s.ingest_dir)
    dup = ledger.status("dup")
    assert dup is not None and dup["status"] == "duplicate" and "near-duplicate of a1" in dup["reason"]
    for pid, why in REJECTED.items():
        st = ledger.status(pid)
        assert st is not None and st["status"] == "rejected" and why in st["reason"]
    assert ledger.status("low") is None  # under the subreddit's minimum score: never considered

    # metadata as the DESIGN has it; NSFW kept and flagged; sizes are the image's own
    _, meta = stored["a1"]
    assert meta["title"] == "post a1" and meta["subreddit"] == "memes" and meta["score"] == 9000
    assert meta["permalink"] == "/r/memes/comments/a1/post_a1/"  # a reddit path, nothing else
    assert (meta["width"], meta["height"]) == (160, 120) and meta["over_18"] is False
    assert stored["n1"][1]["over_18"] is True and stored["d1"][1]["subreddit"] == "dankmemes"
    doc = json.loads(blobs.get(post_key("a1")) or b"{}")
    assert doc["author"] == "u_a1" and doc["created_utc"] > 1.7e9 and doc["url"].endswith("/i/a1.jpg")
    for pid in GOOD:
        assert blobs.exists(image_key(pid, "jpg")) and blobs.exists(feature_key(engines.reranker.version, pid))

    # a gallery is its first image; a GIF is its first frame
    fetched = {r["path"] for r in reddit.requests}
    assert "/i/g1a.jpg" in fetched and "/i/g1b.jpg" not in fetched
    gif_first = Image.open(io.BytesIO(picture(40))).convert("RGB")
    stored_gif = Image.open(io.BytesIO(blobs.get(image_key("gf", "jpg")) or b""))
    assert np.bitwise_count(np.frombuffer(dhash(stored_gif), np.uint8) ^ np.frombuffer(dhash(gif_first), np.uint8)).sum() <= 10

    # the 429 was honoured: the page was asked again after Retry-After; every request said who it is
    page2 = [r for r in reddit.listing_requests() if r["query"].get("after") == ["t3_n1"]]
    assert len(page2) == 2 and page2[1]["t"] - page2[0]["t"] >= reddit.retry_after_s * 0.95
    assert {r["headers"].get("User-Agent") for r in reddit.requests} == {s.fetch.user_agent}

    # and search reads what ingest wrote
    searcher = Searcher(s, engines.text, vectors, blobs, engines.reranker)
    out = searcher.search(SearchParams(query="a picture", limit=32, filter={"over_18": None}))
    assert {r.id for r in out.results} == GOOD and not out.not_reranked
    safe = searcher.search(SearchParams(query="a picture", limit=32))  # NSFW is left out unless asked for
    assert {r.id for r in safe.results} == GOOD - {"n1"}


def test_rerun_downloads_and_adds_nothing(reddit, tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    populate(reddit)
    s = reddit_settings(reddit, tmp_path / "data", tiny_models)
    first = _ingest(s, engines)
    assert first.ingested == len(GOOD)
    n_requests = len(reddit.requests)
    again = _ingest(s, engines)
    downloads = [r for r in reddit.requests[n_requests:] if r["path"].startswith("/i/")]
    assert again.ingested == 0 and again.duplicates == 0 and not again.failed and downloads == []
    assert again.skipped == len(GOOD) + 1 + len(FAILED)  # ingested, the duplicate, the permanent failures
    assert make_vector_store(s).stats()["total_vector_count"] == len(GOOD)


def test_transient_failures_are_retried_by_later_runs_up_to_a_limit(reddit, tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    reddit.listings = {"memes": [post("t1", reddit.image_url("t1.jpg"))]}
    reddit.files = {"t1.jpg": Served(status=503)}
    s = reddit_settings(reddit, tmp_path / "data", tiny_models, reddit_subreddits={"memes": 1000}, ingest_retries=0,
                        ingest_max_attempts=2)
    assert "HTTP 503" in _ingest(s, engines).failed["t1"]
    assert "t1" in _ingest(s, engines).failed  # tried again: the second attempt
    third = _ingest(s, engines)
    assert not third.failed and third.skipped == 1  # out of attempts: settled
    reddit.files = {"t1.jpg": Served(body=picture(9))}
    assert _ingest(s, engines, None).ingested == 0
    assert _ingest(s.model_copy(update={"ingest_max_attempts": 5}), engines).ingested == 1


def test_oauth_app_only_when_credentials_are_set(reddit, tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    reddit.listings = {"memes": [post("o1", reddit.image_url("o1.jpg"))]}
    reddit.files = {"o1.jpg": Served(body=picture(11))}
    s = reddit_settings(reddit, tmp_path / "data", tiny_models, reddit_subreddits={"memes": 1000},
                        reddit_client_id=reddit.client_id, reddit_client_secret=reddit.client_secret)
    assert _ingest(s, engines).ingested == 1
    paths = [r["path"] for r in reddit.requests]
    assert paths[0] == "/api/v1/access_token" and "/r/memes/top" in paths and "/r/memes/top.json" not in paths
    bad = reddit_settings(reddit, tmp_path / "data2", tiny_models, reddit_subreddits={"memes": 1000},
                          reddit_client_id=reddit.client_id, reddit_client_secret="wrong")
    rep = _ingest(bad, engines)
    assert rep.ingested == 0 and "401" in rep.source_failures["memes"]


def test_folder_source_with_csv_and_sidecars_and_a_broken_file(tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}.jpg").write_bytes(picture(100 + i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image")
    (folder / "metadata.csv").write_text("file,id,title,score,over_18\nf0.jpg,post0,first one,42,true\n")
    (folder / "f1.json").write_text(json.dumps({"title": "from a sidecar", "subreddit": "pics"}))
    s = make_settings(tmp_path / "data", tiny_models)
    rep = _ingest(s, engines, FolderSource(folder))
    assert rep.ingested == 5 and set(rep.failed) == {"broken"} and "corrupt" in rep.failed["broken"]
    got = make_vector_store(s).fetch(["post0", "f1"])
    assert got["post0"][1]["title"] == "first one" and got["post0"][1]["score"] == 42 and got["post0"][1]["over_18"] is True
    assert got["f1"][1]["title"] == "from a sidecar" and got["f1"][1]["subreddit"] == "pics"


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=timeout)


def test_cli_ingest_folder_prints_a_summary_and_reruns_add_nothing(tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"c{i}.jpg").write_bytes(picture(200 + i))
    env = settings_env(tmp_path / "data", tiny_models, "redis://127.0.0.1:1/0")
    first = _cli(env, "ingest", "--source", "folder", str(folder))
    assert first.returncode == 0, first.stderr
    assert "ingested 6" in first.stdout and "failed 0" in first.stdout and "embed" in first.stdout
    again = _cli(env, "ingest", str(folder))
    assert again.returncode == 0 and "ingested 0" in again.stdout and "skipped 6" in again.stdout
    missing = _cli(env, "ingest", "--source", "folder", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def _ledger_value(path: Path, sql: str) -> Any:
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute(sql).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        db.close()


def test_killed_midway_then_rerun_completes_with_no_duplicate_and_no_gap(reddit, tmp_path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    n = 24
    reddit.listings = {"memes": [post(f"k{i:02d}", reddit.image_url(f"k{i:02d}.jpg"), score=9000 - i) for i in range(n)]}
    reddit.files = {f"k{i:02d}.jpg": Served(body=picture(300 + i), delay_s=0.15) for i in range(n)}
    env = {**settings_env(tmp_path / "data", tiny_models, "redis://127.0.0.1:1/0"), **reddit_env(reddit),
           "IMGSEARCH_REDDIT_SUBREDDITS": json.dumps({"memes": 1000}), "IMGSEARCH_INGEST_BATCH_SIZE": "2",
           "IMGSEARCH_INGEST_CONCURRENCY": "2"}
    ledger = tmp_path / "data" / "ingest" / "ledger.sqlite3"
    proc = stack._spawn("ingest", [sys.executable, "-m", "cli.main", "ingest"], env, tmp_path / "first.log")
    try:
        # killed once its first page is checkpointed, with later pages still in flight
        stack.wait_for(lambda: _ledger_value(ledger, "SELECT cursor FROM runs WHERE cursor IS NOT NULL") is not None
                       or not proc.alive(), 120, "the first checkpoint")
        assert proc.alive(), (tmp_path / "first.log").read_text()
        proc.signal_group(signal.SIGKILL)
        proc.popen.wait(10)
    finally:
        proc.stop()
    done_first = _ledger_value(ledger, "SELECT count(*) FROM items WHERE status='ingested'")
    assert 0 < done_first < n
    listed_before = len(reddit.listing_requests())
    rerun = _cli(env, "ingest")
    assert rerun.returncode == 0, rerun.stderr
    assert "(resumed)" in rerun.stdout
    # resumed past the checkpoint: the first page was not listed again
    assert all(r["query"].get("after") for r in reddit.listing_requests()[listed_before:])
    s = make_settings(tmp_path / "data", tiny_models)
    vectors = make_vector_store(s)
    ids = [f"k{i:02d}" for i in range(n)]
    assert set(vectors.fetch(ids)) == set(ids) and vectors.stats()["total_vector_count"] == n
    assert _ledger_value(ledger, "SELECT count(*) FROM items WHERE status='ingested'") == n
    assert _ledger_value(ledger, "SELECT count(*) FROM runs WHERE finished IS NULL") == 0


def test_takedown_removes_a_post_everywhere_and_keeps_it_out(reddit, tmp_path, tiny_models, engines, redis_server) -> None:  # type: ignore[no-untyped-def]
    from pipeline.cache import FeatureCache, ResultCache, cache_client

    populate(reddit)
    url = redis_server.url(12)
    s = reddit_settings(reddit, tmp_path / "data", tiny_models, redis_url=url, cache_features="on")
    _ingest(s, engines)
    client = cache_client(url)
    client.flushdb()
    fc, rc = FeatureCache(client, 60, 100), ResultCache(client, 60)
    fc.put_many(engines.reranker.version, {"a1": b"x", "a2": b"y"})
    client.set(f"{rc.key('q', {}, [])}", b"{}")
    env = {**settings_env(tmp_path / "data", tiny_models, url), **reddit_env(reddit), "IMGSEARCH_CACHE_FEATURES": "on"}
    out = _cli(env, "delete", "a1")
    assert out.returncode == 0, out.stderr
    assert "a1: 1 vector(s)" in out.stdout
    blobs = make_blob_store(s)
    assert make_vector_store(s).fetch(["a1", "a2"]).keys() == {"a2"}
    assert not blobs.exists(image_key("a1", "jpg")) and not blobs.exists(post_key("a1"))
    assert not blobs.exists(feature_key(engines.reranker.version, "a1")) and blobs.exists(post_key("a2"))
    assert fc.get_many(engines.reranker.version, ["a1", "a2"]).keys() == {"a2"}
    assert not list(client.scan_iter(match="imgsearch:cache:q:*"))
    assert (Ledger(s.ingest_dir).status("a1") or {})["status"] == "taken_down"
    again = _ingest(s, engines)  # the post is still listed: it stays out
    assert again.ingested == 0 and "a1" not in make_vector_store(s).fetch(["a1"])


@pytest.mark.integration
def test_beat_starts_ingest_runs_on_the_ingest_queue(redis_server, tmp_path, tiny_models, demo_images) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url(13)
    redis.Redis.from_url(url).flushdb()
    env = settings_env(tmp_path / "data", tiny_models, url, IMGSEARCH_INGEST_SOURCE="folder",
                       IMGSEARCH_INGEST_FOLDER=str(demo_images), IMGSEARCH_INGEST_SCHEDULE="1",
                       IMGSEARCH_INGEST_DEDUP="off")
    ledger = tmp_path / "data" / "ingest" / "ledger.sqlite3"
    procs = [stack._spawn("ingest-worker", [sys.executable, "-m", "cli.main", "worker", "--queue", "ingest",
                                            "--pool", "solo"], env, tmp_path / "worker.log"),
             stack._spawn("beat", [sys.executable, "-m", "cli.main", "beat"], env, tmp_path / "beat.log")]
    try:
        # two finished runs: the first ingests the folder, the next (on schedule) finds nothing new
        stack.wait_for(lambda: (_ledger_value(ledger, "SELECT count(*) FROM runs WHERE finished IS NOT NULL") or 0) >= 2,
                       180, "two scheduled ingest runs")
    finally:
        for p in procs:
            p.stop()
    assert _ledger_value(ledger, "SELECT count(*) FROM items WHERE status='ingested'") == 48
    reports = [json.loads(r) for r in sqlite3.connect(ledger).execute(
        "SELECT report FROM runs WHERE finished IS NOT NULL ORDER BY started").fetchall() for r in r]
    assert reports[0]["ingested"] == 48 and reports[1]["ingested"] == 0 and reports[1]["skipped"] == 48
    worker_log = (tmp_path / "worker.log").read_text()
    assert "imgsearch.ingest" in worker_log


@pytest.mark.integration
def test_admin_endpoint_takes_a_post_down_through_a_worker(redis_server, store_dir, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import httpx

    from pipeline.admission.callers import hash_key
    from tests.live import start_stack

    data = tmp_path / "data"
    shutil.copytree(store_dir, data)
    url = redis_server.url(14)
    redis.Redis.from_url(url).flushdb()
    user, admin = "isk_user-s3cret", "isk_admin-s3cret"
    keys = [{"name": "app", "sha256": hash_key(user)}, {"name": "ops", "sha256": hash_key(admin), "admin": True}]
    live = start_stack(settings_env(data, tiny_models, url, IMGSEARCH_API_KEYS=json.dumps(keys)), tmp_path / "logs")

    def search() -> list[str]:
        r = httpx.post(f"{live.base}/search", json={"query": "a red circle", "limit": 32},
                       headers={"X-API-Key": user}, timeout=60)
        assert r.status_code == 200, r.text
        return [pid for pid, _ in r.json()["results"]]

    try:
        victim = search()[0]
        path = f"{live.base}/v1/admin/posts/{victim}"
        assert httpx.delete(path, timeout=10).status_code == 401
        wrong = httpx.delete(path, headers={"X-API-Key": user}, timeout=10)
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        bad = httpx.delete(f"{live.base}/v1/admin/posts/a%20b", headers={"X-API-Key": admin}, timeout=10)
        assert bad.status_code == 422
        thumb = httpx.get(f"{live.base}/v1/images/{victim}?size=128", headers={"X-API-Key": user}, timeout=10)
        assert thumb.status_code == 200  # made, and kept in the blob store
        r = httpx.delete(path, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["removed"]["vectors"] == 1 and f"images/{victim}.jpg" in r.json()["removed"]["blobs"]
        assert f"thumbs/{victim}/128.jpg" in r.json()["removed"]["blobs"]
        after = search()  # the same query again: not answered from the result cache
        assert victim not in after and len(after) == 32
        for size in ("", "?size=128"):  # images are behind the keys while keys are configured
            assert httpx.get(f"{live.base}/v1/images/{victim}{size}", headers={"X-API-Key": user},
                             timeout=10).status_code == 404
    finally:
        live.stop()
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "s3cret" not in logs


def test_parallel_embed_streams_store_what_one_stream_stores(tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    from engines.registry import embed_streams

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):  # odd: the streams get unequal shares
        (folder / f"s{i}.jpg").write_bytes(picture(400 + i))
    stored = []
    for name, streams in (("one", ()), ("two", [(engines.image, engines.reranker)] * 2)):
        s = make_settings(tmp_path / name, tiny_models, ingest_batch_size=4)
        vectors = make_vector_store(s)
        rep = run_ingest(s, FolderSource(folder), engines.image, engines.reranker, vectors, make_blob_store(s),
                         embedders=streams)
        assert rep.ingested == 7
        blobs = make_blob_store(s)
        stored.append(({k: v[0] for k, v in vectors.fetch([f"s{i}" for i in range(7)]).items()},
                       {i: blobs.get(feature_key(engines.reranker.version, f"s{i}")) for i in range(7)}))
    (v1, f1), (v2, f2) = stored
    assert v1.keys() == v2.keys() and all(np.allclose(v1[k], v2[k], atol=1e-6) for k in v1)
    assert f1 == f2
    assert embed_streams(make_settings(tmp_path, tiny_models, engine_backend="onnxruntime")) == len(os.sched_getaffinity(0))
    assert embed_streams(make_settings(tmp_path, tiny_models)) == 1  # torch: its own threads
    assert embed_streams(make_settings(tmp_path, tiny_models, ingest_embed_streams=3)) == 3


def test_a_write_that_fails_for_one_item_is_recorded_for_it_and_the_run_goes_on(tmp_path, tiny_models, engines) -> None:  # type: ignore[no-untyped-def]
    from pipeline.errors import InvalidRequest, Unavailable

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        (folder / f"w{i}.jpg").write_bytes(picture(500 + i))
    s = make_settings(tmp_path / "data", tiny_models, ingest_batch_size=5, ingest_dedup="off")
    blobs = make_blob_store(s)

    class Refusing:  # the local blob store, refusing one post's keys as a store refuses a bad key
        def __init__(self, fail: type[Exception], pid: str) -> None:
            self.fail, self.pid = fail, pid

        def put(self, key: str, data: bytes) -> None:
            if self.pid in key:
                raise self.fail(f"invalid blob key {key!r}")
            blobs.put(key, data)

        def __getattr__(self, name: str) -> Any:
            return getattr(blobs, name)

    vectors = make_vector_store(s)
    rep = run_ingest(s, FolderSource(folder), engines.image, engines.reranker, vectors, Refusing(InvalidRequest, "w2"))
    assert rep.ingested == 4 and set(rep.failed) == {"w2"} and "write failed" in rep.failed["w2"]
    assert set(vectors.fetch([f"w{i}" for i in range(5)])) == {"w0", "w1", "w3", "w4"}
    ledger = Ledger(s.ingest_dir)
    assert (ledger.status("w2") or {})["permanent"] is True  # the caller's kind of error: not tried again
    assert ledger.runs()[-1]["finished"] is not None
    # a store that is down is no item's fault: the run stops, unfinished, to resume later
    (folder / "w5.jpg").write_bytes(picture(505))
    with pytest.raises(Unavailable):
        run_ingest(s, FolderSource(folder), engines.image, engines.reranker, vectors, Refusing(Unavailable, "w5"))
    vectors.close()  # type: ignore[attr-defined]
    assert ledger.runs()[-1]["finished"] is None

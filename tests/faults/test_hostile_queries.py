"""Hostile query pictures and hosts, round two, through the real processes (a redis-server, a Celery worker, the
API under uvicorn): files that cost nothing to send and much to decode (an RLE BMP, a PCD sniffed as JPEG, a
154 KB PNG of 6300 x 6300 RGBA, four of each at once), URLs to other ports, to 6to4, NAT64 and special-purpose
addresses and redirects to Redis's port, forty image hosts that accept and never answer, and pictures that
would outlive their jobs.

After each attack: a normal query still works, every accepted job ended done (nothing lost), no picture is left
in Redis beside an ended job, and a refused picture left no job (nothing left behind). Each attack's cost to the
API process (CPU seconds, RSS growth sampled every 5 ms) is asserted against a bound and, with
``ATTACK_TABLE=<path>``, written there as a Markdown table (the note's)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from bench.query_decode import pcd_as_jpeg, png, rle8_bmp
from bench.slow_hosts import SlowFetches, SlowHost, env_for, p, slow_host, text_posts
from cli import stack
from pipeline.jobs.keys import PREFIX
from tests.conftest import settings_env
from tests.live import Live, start_stack

pytestmark = [pytest.mark.hostile, pytest.mark.faults, pytest.mark.integration]

DB = 9
FETCH_S = 6.0  # the stack's image_url deadline and lane wait: every slow fetch stays open while the text POSTs run
FETCH_THREADS = 8
ROWS: list[dict[str, str]] = []  # the attack table


def _picture(fmt: str, size: tuple[int, int] = (64, 64), **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg_12mp() -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((4000, 3000)).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _GoodHost(BaseHTTPRequestHandler):
    """An image host that answers: a PNG, or a redirect to wherever ``/to?u=`` says."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:" + self.path.removeprefix("/to/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = _picture("PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class World:
    live: Live
    slow: SlowHost
    good: str  # the answering host's base URL
    redis_port: int
    r: redis.Redis
    accepted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # ended failed on purpose: not lost

    @property
    def api_pid(self) -> int:
        return self.live.procs[-1].pid


@pytest.fixture(scope="module")
def world(redis_server, store_dir, tiny_models, tmp_path_factory) -> Iterator[World]:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_server.url(DB))
    r.flushdb()
    good = ThreadingHTTPServer(("127.0.0.1", 0), _GoodHost)
    threading.Thread(target=good.serve_forever, daemon=True).start()
    with slow_host() as slow:
        env = settings_env(store_dir, tiny_models, redis_server.url(DB), **env_for(slow, FETCH_S))
        # both stand-ins' ports, and addresses of every kind the URL check must refuse named as allowed hosts, so
        # that what refuses them is the address check (an allowed name resolving there would be refused alike)
        env["IMGSEARCH_INGEST_ALLOW_PORTS"] = f"[{slow.port}, {good.server_address[1]}]"
        env["IMGSEARCH_REDDIT_IMAGE_HOSTS"] = ('["127.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1", "192.0.0.8", '
                                               '"198.18.0.1", "2001::1"]')
        env["IMGSEARCH_IMAGE_FETCH_THREADS"] = str(FETCH_THREADS)
        live = start_stack(env, tmp_path_factory.mktemp("hostile-queries"))
        try:
            yield World(live, slow, f"http://127.0.0.1:{good.server_address[1]}", redis_server.port, r)
        finally:
            live.stop()
            good.shutdown()
            if os.environ.get("ATTACK_TABLE"):
                lines = ["| attack | status | API CPU s | API RSS +MiB | left | lost |", "|---|---|---|---|---|---|"]
                lines += [f"| {w['attack']} | {w['status']} | {w['cpu']} | {w['rss']} | {w['left']} | {w['lost']} |"
                          for w in ROWS]
                Path(os.environ["ATTACK_TABLE"]).write_text("\n".join(lines) + "\n")


# --- what an attack cost the API, and what it left ---

def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Cost:
    cpu_s: float = 0.0
    rss_mib: float = 0.0


class _Measured:
    """The API process's CPU seconds and RSS growth (sampled every 5 ms) over a block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.cost, self._stop = pid, Cost(), threading.Event()

    def __enter__(self) -> Cost:
        self.cpu0, self.rss0, self.peak = _cpu_s(self.pid), _rss(self.pid), 0
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self.cost

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.cost.cpu_s = _cpu_s(self.pid) - self.cpu0
        self.cost.rss_mib = max(0, self.peak - self.rss0) / 2**20


def _upload(w: World, data: bytes, name: str = "x.png") -> httpx.Response:
    return httpx.post(f"{w.live.base}/v1/jobs", files={"image": (name, data, "application/octet-stream")},
                      data={"options": '{"limit": 3}'}, timeout=60)


def _accepted(w: World, resp: httpx.Response) -> str:
    assert resp.status_code == 202, resp.text
    job_id = str(resp.json()["id"])
    w.accepted.append(job_id)
    return job_id


def _aftermath(w: World) -> tuple[str, str]:
    """After an attack: a normal upload and a normal image_url are searched to their end; every accepted job
    ended done (lost: none), no job but the accepted ones exists and no picture is kept beside an ended job
    (left: none). Returns the table's 'left' and 'lost' cells."""
    for resp in (_upload(w, _picture("PNG")),
                 httpx.post(f"{w.live.base}/v1/jobs", json={"image_url": f"{w.good}/cat.png"}, timeout=30)):
        _accepted(w, resp)
    jobs = {j: w.live.wait(j) for j in w.accepted}
    lost = [j for j, job in jobs.items() if job["status"] != "done" or not job.get("results")]
    records = {k.decode().split(":")[2] for k in w.r.scan_iter(f"{PREFIX}:job:*") if k.decode().count(":") == 2}
    pictures = [k.decode() for k in w.r.scan_iter(f"{PREFIX}:job:*:image")]
    assert lost == [], {j: jobs[j] for j in lost}
    assert records == set(w.accepted) | set(w.cancelled), records ^ set(w.accepted)  # a refused picture made none
    assert pictures == []  # every job ended, and its picture went with its end
    return "nothing", "nothing"


def _row(attack: str, status: str, cost: Cost, left: str, lost: str) -> None:
    ROWS.append({"attack": attack, "status": status, "cpu": f"{cost.cpu_s:.2f}", "rss": f"{cost.rss_mib:.0f}",
                 "left": left, "lost": lost})


def _four_at_once(w: World, data: bytes, name: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: _upload(w, data, name), range(4)))


# --- the attacks ---

def _bmp_rle8() -> bytes:
    return rle8_bmp()


def _png_6300() -> bytes:
    return png(6300, 6300, "RGBA")


@pytest.mark.parametrize(("attack", "make", "status", "codes", "cpu_s", "rss_mib"), [
    # 26 KB that Pillow's pure-Python RLE decoder took 4 s and 221 MiB for: refused by its first bytes
    ("RLE8 BMP 6320x6320, 26 KB, x4", _bmp_rle8, 422, {"unsupported_format"}, 0.5, 16),
    # a JPEG's first bytes and a PhotoCD block at 2048: opened as JPEG only (which refuses it), never as PCD
    ("JPEG header + PCD block, x4", pcd_as_jpeg, 422, {"bad_image"}, 0.5, 16),
    # 154 KB of 6300x6300 RGBA: 332 MiB to decode; refused from its header by the decode budget
    ("PNG 6300x6300 RGBA, 154 KB, x4", _png_6300, 422, {"image_too_large"}, 0.5, 16),
    ("TIFF", lambda: _picture("TIFF"), 422, {"unsupported_format"}, 0.5, 16),
    # accepted: the JPEG draft decodes it at half scale (2000x1500), the decode lane takes two at a time
    ("JPEG 4000x3000 (12 MP), x4", _jpeg_12mp, 202, {""}, 3.0, 2 * 64 + 32),
], ids=["bmp-rle8", "pcd-as-jpeg", "png-6300-rgba", "tiff", "jpeg-12mp"])
def test_a_costly_picture_is_refused_before_it_is_decoded_or_decoded_within_budget(  # type: ignore[no-untyped-def]
        world: World, attack: str, make: Callable[[], bytes], status: int, codes: set[str], cpu_s: float,
        rss_mib: float) -> None:
    data = make()
    copies = 4 if "x4" in attack else 1
    with _Measured(world.api_pid) as cost:
        answers = _four_at_once(world, data, "q.bin") if copies == 4 else [_upload(world, data, "q.bin")]
    for resp in answers:
        assert resp.status_code == status, resp.text
        if status == 202:
            _accepted(world, resp)
        else:
            assert set(resp.json()) == {"error"} and resp.json()["error"]["code"] in codes, resp.text
    assert cost.cpu_s < cpu_s and cost.rss_mib < rss_mib, (attack, cost)
    _row(attack, f"{status} {'/'.join(sorted(codes)) or 'accepted'}", cost, *_aftermath(world))


def test_urls_to_other_ports_and_special_addresses_are_refused_on_every_hop(world: World) -> None:
    good_port = world.good.rsplit(":", 1)[1]
    urls = [f"http://127.0.0.1:{world.redis_port}/",  # Redis itself: its port is not an allowed one
            f"{world.good}/to/{world.redis_port}/",  # a redirect there from an allowed host
            f"http://[2002:7f00:1::]:{good_port}/a.png",  # 6to4 of 127.0.0.1
            f"http://[64:ff9b::7f00:1]:{good_port}/a.png",  # NAT64 of 127.0.0.1
            f"http://192.0.0.8:{good_port}/a.png", f"http://198.18.0.1:{good_port}/a.png",
            f"http://[2001::1]:{good_port}/a.png"]
    with _Measured(world.api_pid) as cost:
        answers = [httpx.post(f"{world.live.base}/v1/jobs", json={"image_url": u}, timeout=30) for u in urls]
    for u, resp in zip(urls, answers, strict=True):
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "url_refused", (u, resp.text)
    assert "port" in answers[0].json()["error"]["message"] and "port" in answers[1].json()["error"]["message"]
    _row("image_url to Redis's port, a redirect there, 6to4, NAT64, 192.0.0.8, 198.18/15, 2001::/23",
         "422 url_refused", cost, *_aftermath(world))


def test_a_picture_is_dropped_when_its_job_ends_however_it_ends(world: World) -> None:
    done = _accepted(world, _upload(world, _picture("PNG", (1024, 1024))))
    cancelled = _accepted(world, _upload(world, _picture("WEBP")))
    httpx.delete(f"{world.live.base}/v1/jobs/{cancelled}", timeout=10)  # queued or running: ends either way
    for job_id in (done, cancelled):
        world.live.wait(job_id)
        assert world.r.exists(f"{PREFIX}:job:{job_id}:image") == 0
    world.accepted.remove(cancelled)
    world.cancelled.append(cancelled)
    _row("query pictures outliving their jobs", "dropped by the job's end", Cost(), *_aftermath(world))


def test_forty_slow_image_hosts_move_a_text_post_p99_by_under_50_ms(world: World) -> None:
    base, slow = world.live.base, world.slow
    text_posts(base, 10)  # warm
    quiet = text_posts(base, 80)
    before = len(slow.conns)
    with _Measured(world.api_pid) as cost:
        flood = SlowFetches(base, slow, 40)
        stack.wait_for(lambda: len(slow.conns) - before >= FETCH_THREADS, 30, "the download lane to fill")
        loaded = text_posts(base, 80)
        assert flood.statuses == [], "a slow fetch ended while the text POSTs ran: the figure is not under load"
        assert len(slow.conns) - before == FETCH_THREADS  # 40 open, never more downloads at once than the lane has
        flood.join(4 * FETCH_S + 30)
    moved = p(loaded, 99) - p(quiet, 99)
    codes = {code for _, code in flood.statuses}
    assert len(flood.statuses) == 40 and codes <= {"image_fetch_failed", "busy"}, flood.statuses
    stack.wait_for(lambda: slow.open_now == 0, 10, "the API to close every slow connection")
    assert moved < 50, f"text POST p99 {p(quiet, 99):.1f} ms quiet, {p(loaded, 99):.1f} ms with 40 slow fetches"
    ROWS.append({"attack": "40 image_url jobs at a host that never answers",
                 "status": f"422 image_fetch_failed / 503 busy; text POST p99 {p(quiet, 99):.0f} -> "
                           f"{p(loaded, 99):.0f} ms",
                 "cpu": f"{cost.cpu_s:.2f}", "rss": f"{cost.rss_mib:.0f}", "left": "", "lost": ""})
    # the text jobs were accepted like any: they are searched too
    keys = [k.decode().split(":")[2] for k in world.r.scan_iter(f"{PREFIX}:job:*") if k.decode().count(":") == 2]
    world.accepted.extend(k for k in keys if k not in world.accepted and k not in world.cancelled)
    ROWS[-1]["left"], ROWS[-1]["lost"] = _aftermath(world)


class _BigListing(BaseHTTPRequestHandler):
    """A Reddit listing of 64 MiB of JSON, gzip-compressed to about 64 KB on the wire."""

    seen: list[str] = []
    body = __import__("gzip").compress(b'{"data": {"children": [], "pad": "' + b" " * (64 << 20) + b'"}}', 6)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_listing_client_caps_its_body_and_ignores_the_environments_proxy(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline.errors import Unavailable
    from pipeline.ingest.sources import RedditSource
    from pipeline.settings import IngestSettings

    server = ThreadingHTTPServer(("127.0.0.1", 0), _BigListing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # a proxy that would swallow every request, were the environment believed
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        s = IngestSettings(data_dir=tmp_path, reddit={"public_url": f"http://127.0.0.1:{server.server_address[1]}",
                                                      "max_listing_bytes": 1 << 20},
                           fetch={"retries": 0})
        source = RedditSource(s)
        with _Measured(os.getpid()) as cost, pytest.raises(Unavailable, match="over 1,048,576 bytes"):
            source.listing("memes", None)
        assert _BigListing.seen and _BigListing.seen[0].startswith("/r/memes/")  # reached directly, not via the proxy
        assert cost.rss_mib < 32  # read up to the cap, not 64 MiB
    finally:
        server.shutdown()

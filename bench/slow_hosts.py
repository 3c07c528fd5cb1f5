"""A text ``POST /v1/jobs``'s latency while ``image_url`` jobs point at hosts that accept and never answer.

One API process (uvicorn, one event loop) over its own redis-server, no worker (jobs stay queued: the figure is
the API's, not a search's). A stand-in host on loopback accepts every connection and never sends a byte. The
text POSTs run one after another, first with no slow fetch open, then with ``--slow`` (40) ``image_url`` jobs
open against the stand-in: ``image_fetch_threads`` of them fetching, the rest waiting for a place in the
download lane (api.lanes), none on a thread another route needs.

    python -m bench.slow_hosts            # 200 text POSTs each way
    python -m bench.slow_hosts --quick    # 80

Prints both p50/p99 and the last line ``p99_ms_quiet=<ms> p99_ms_slow=<ms> moved_ms=<ms>``. The hostile test
(tests/faults/test_hostile_queries.py) runs the same measurement against its stack.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from cli import stack

TEXT = {"query": "a cat that looks surprised", "limit": 5}


@dataclass
class SlowHost:
    """A TCP server on loopback that accepts and never answers (what the issue's slow image host did)."""

    port: int = 0
    conns: list[socket.socket] = field(default_factory=list)
    _sock: socket.socket | None = None

    @property
    def open_now(self) -> int:
        """Connections the peer has not closed yet (what a peer sent is read and dropped, up to its end)."""
        alive = 0
        for c in list(self.conns):
            try:
                c.setblocking(False)
                while c.recv(65536):
                    pass
            except BlockingIOError:
                alive += 1  # nothing more to read, and no end: still open
            except OSError:
                pass
        return alive

    def url(self, name: str = "cat.png") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@contextmanager
def slow_host() -> Iterator[SlowHost]:
    host = SlowHost()
    sock = host._sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    host.port = sock.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            host.conns.append(conn)  # held, never read from nor written to

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield host
    finally:
        sock.close()
        for c in host.conns:
            c.close()


def env_for(host: SlowHost, fetch_s: float) -> dict[str, str]:
    """The API settings that send image_url fetches to the stand-in (and nowhere else on loopback)."""
    return {"IMGSEARCH_REDDIT_IMAGE_HOSTS": '["127.0.0.1"]', "IMGSEARCH_INGEST_ALLOW_NETWORKS": '["127.0.0.1/32"]',
            "IMGSEARCH_INGEST_ALLOW_PORTS": f"[{host.port}]", "IMGSEARCH_IMAGE_QUERY_FETCH_S": str(fetch_s),
            "IMGSEARCH_LANE_WAIT_S": str(fetch_s)}


def text_posts(base: str, n: int, headers: dict[str, str] | None = None) -> list[float]:
    """``n`` text POSTs one after another: each one's seconds (every one must be accepted)."""
    out = []
    with httpx.Client(timeout=30, headers=headers) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post(f"{base}/v1/jobs", json=TEXT)
            out.append(time.perf_counter() - t0)
            assert r.status_code == 202, r.text
    return out


def p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1000, q))


class SlowFetches:
    """``n`` image_url POSTs at ``host``, each on a thread of the client's; ``statuses`` once they answered."""

    def __init__(self, base: str, host: SlowHost, n: int, headers: dict[str, str] | None = None) -> None:
        self.statuses: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=self._one, args=(base, host.url(f"{i}.png"), headers), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, base: str, url: str, headers: dict[str, str] | None) -> None:
        try:
            r = httpx.post(f"{base}/v1/jobs", json={"image_url": url}, timeout=120, headers=headers)
            code = r.json().get("error", {}).get("code", "") if r.status_code != 202 else ""
            self.statuses.append((r.status_code, code))
        except httpx.HTTPError as exc:
            self.statuses.append((0, type(exc).__name__))

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))


def measure(base: str, host: SlowHost, n: int, slow: int, fetch_threads: int) -> dict[str, float]:
    """Text POST p50/p99 quiet, then with ``slow`` fetches open (once ``fetch_threads`` of them reached the host)."""
    text_posts(base, 10)  # warm up
    quiet = text_posts(base, n)
    flood = SlowFetches(base, host, slow)
    stack.wait_for(lambda: len(host.conns) >= min(slow, fetch_threads), 30, "the slow fetches to connect")
    loaded = text_posts(base, n)
    still_open = len(flood.statuses) == 0  # no slow fetch answered while the text POSTs ran
    flood.join(120)
    return {"p50_ms_quiet": p(quiet, 50), "p99_ms_quiet": p(quiet, 99), "p50_ms_slow": p(loaded, 50),
            "p99_ms_slow": p(loaded, 99), "moved_ms": p(loaded, 99) - p(quiet, 99), "all_open": float(still_open),
            "slow_answers": float(len(flood.statuses))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="80 text POSTs each way instead of 200")
    ap.add_argument("--slow", type=int, default=40, help="image_url jobs open against the slow host")
    args = ap.parse_args()
    n = 80 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp, slow_host() as host:
        work = Path(tmp)
        redis_port, api_port = stack.free_port(), stack.free_port()
        redis = stack.start_redis(redis_port, work, work / "redis.log")
        fetch_s = 30.0  # longer than the text POSTs take: every slow fetch stays open while they run
        env = {**env_for(host, fetch_s), "IMGSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "IMGSEARCH_DATA_DIR": str(work / "data"), "IMGSEARCH_RATE_LIMIT_PER_MIN": "0",
               "IMGSEARCH_MAX_JOBS_IN_FLIGHT": "0", "IMGSEARCH_REAPER_INTERVAL_S": "0", "IMGSEARCH_LOG_LEVEL": "WARNING"}
        api = stack.start_api(env, api_port, work / "api.log")
        base = f"http://127.0.0.1:{api_port}"
        try:
            stack.wait_for(lambda: stack.http_ok(base + "/healthz"), 60, "the API", interval=0.2)
            got = measure(base, host, n, args.slow, 8)
        finally:
            api.stop()
            redis.stop()
    print(f"# {n} text POST /v1/jobs one after another; then with {args.slow} image_url fetches open at a host that "
          "never answers")
    for k, v in got.items():
        print(f"{k:<14} {v:9.1f}")
    print(f"p99_ms_quiet={got['p99_ms_quiet']:.1f} p99_ms_slow={got['p99_ms_slow']:.1f} moved_ms={got['moved_ms']:.1f}")


if __name__ == "__main__":
    main()

"""Downloads with bounded concurrency: a pool of threads sharing one HTTP connection pool, each download
with a timeout, a size cap checked as bytes arrive, and bounded retries on timeouts, 429 and 5xx; then the
image is sniffed, guarded and normalised on the same thread (PIL decodes without the GIL), so the embed
stage finds images ready."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from pipeline.ingest.images import BadImage, Prepared, prepare
from pipeline.settings import Settings


class FetchError(Exception):
    """A download that failed; ``permanent`` failures are not retried by later runs."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class Downloader:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        n = settings.ingest_concurrency
        self.http = httpx.Client(timeout=settings.ingest_timeout_s, follow_redirects=True, max_redirects=5,
                                 headers={"User-Agent": settings.reddit_user_agent},
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="download")
        self.busy_s = 0.0  # summed over threads: time spent fetching
        self.decode_s = 0.0

    def submit(self, url: str) -> Future[Prepared]:
        return self.pool.submit(self._one, url)

    def _one(self, url: str) -> Prepared:
        t0 = time.perf_counter()
        data = self.fetch(url)
        t1 = time.perf_counter()
        try:
            return prepare(data, self.s.ingest_max_pixels)
        except BadImage as exc:
            raise FetchError(str(exc), permanent=True) from None
        finally:
            self.busy_s += t1 - t0
            self.decode_s += time.perf_counter() - t1

    def fetch(self, url: str) -> bytes:
        cap = self.s.ingest_max_bytes
        if not url.startswith(("http://", "https://")):
            path = Path(url)
            try:
                if path.stat().st_size > cap:
                    raise FetchError(f"too large: over the {cap:,} bytes allowed", permanent=True)
                return path.read_bytes()
            except OSError as exc:
                raise FetchError(f"unreadable file: {exc.strerror or exc}", permanent=True) from None
        last = ""
        for attempt in range(self.s.ingest_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** attempt, 10))
            try:
                with self.http.stream("GET", url) as r:
                    if r.status_code == 429 or r.status_code >= 500:
                        last = f"HTTP {r.status_code}"
                        retry_after = r.headers.get("retry-after", "")
                        if retry_after.isdigit():
                            time.sleep(min(float(retry_after), self.s.reddit_max_wait_s))
                        continue
                    if r.status_code >= 400:
                        raise FetchError(f"HTTP {r.status_code}", permanent=r.status_code in (401, 403, 404, 410))
                    declared = r.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > cap:
                        raise FetchError(f"too large: {int(declared):,} bytes is over the {cap:,} allowed", permanent=True)
                    buf = bytearray()
                    for chunk in r.iter_bytes():
                        buf += chunk
                        if len(buf) > cap:
                            raise FetchError(f"too large: over the {cap:,} bytes allowed", permanent=True)
                    return bytes(buf)
            except httpx.TransportError as exc:  # timeouts, refused or reset connections: worth another try
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise FetchError(f"download failed after {self.s.ingest_retries + 1} tries: {last}", permanent=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

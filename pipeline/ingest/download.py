"""Downloads with bounded concurrency: a pool of threads, each download checked hop by hop (http(s), an allowed
host, a public address: see ``urls.py``), with a deadline for the whole download, a minimum transfer rate, a
size cap on the bytes read, and bounded retries on timeouts, 429 and 5xx; then the image is sniffed, guarded
and normalised on the same thread (PIL decodes without the GIL), so the embed stage finds images ready.

A folder source's posts are files: they are read from disk here, and only for posts that carry a ``file``
(the folder source sets it; a listing can't)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipeline.ingest.images import BadImage, Prepared, prepare
from pipeline.ingest.urls import Refused, Target, UrlGuard, shown
from pipeline.retry import RetryLater, retrying
from pipeline.settings import SharedSettings

if TYPE_CHECKING:
    from pipeline.ingest.sources import Post

MAX_REDIRECTS = 5


class FetchError(Exception):
    """A download that failed; ``permanent`` failures are not retried by later runs."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class Downloader:
    def __init__(self, settings: SharedSettings) -> None:
        self.s = settings
        self.guard = UrlGuard(settings.fetch.image_hosts, settings.fetch.allow_networks, settings.fetch.allow_ports)
        self.pool = ThreadPoolExecutor(settings.fetch.concurrency, thread_name_prefix="download")
        self._clients: dict[str, httpx.Client] = {}
        self._lock = threading.Lock()
        self.busy_s = 0.0  # summed over threads: time spent fetching
        self.decode_s = 0.0

    def _client(self, host: str) -> httpx.Client:
        """One client per host name: connections go to the checked address, so a pool shared between names
        could send one name's request over a TLS session made for another. Redirects are followed here, hop
        by hop, never by httpx; the environment's proxies and .netrc credentials are not used."""
        with self._lock:
            if host not in self._clients:
                n = self.s.fetch.concurrency
                self._clients[host] = httpx.Client(
                    follow_redirects=False, trust_env=False,
                    headers={"User-Agent": self.s.fetch.user_agent, "Accept-Encoding": "identity"},
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
            return self._clients[host]

    def submit(self, post: Post) -> Future[Prepared]:
        return self.pool.submit(self._one, post)

    def _one(self, post: Post) -> Prepared:
        t0 = time.perf_counter()
        data = self.read_file(post.file) if post.file is not None else self.fetch(post.url)
        t1 = time.perf_counter()
        try:
            return prepare(data, self.s.fetch.max_pixels)
        except BadImage as exc:
            raise FetchError(str(exc), permanent=True) from None
        finally:
            self.busy_s += t1 - t0
            self.decode_s += time.perf_counter() - t1

    def read_file(self, path: Path) -> bytes:
        """A folder source's image, capped like a download."""
        cap = self.s.fetch.max_bytes
        try:
            with open(path, "rb") as fh:
                data = fh.read(cap + 1)
        except OSError as exc:
            raise FetchError(f"unreadable file: {exc.strerror or exc}", permanent=True) from None
        if len(data) > cap:
            raise FetchError(f"too large: over the {cap:,} bytes allowed", permanent=True)
        return data

    def fetch(self, url: str) -> bytes:
        """The bytes at ``url``, within the download's deadline; FetchError says why not."""
        deadline = time.monotonic() + self.s.fetch.deadline_s
        # timeouts, refused or reset connections, 429s and 5xx are worth another try, within the deadline
        again = retrying((httpx.TransportError, RetryLater), attempts=self.s.fetch.retries + 1,
                         within_s=self.s.fetch.deadline_s, first_s=1.0, max_s=10.0,
                         server_wait_max_s=self.s.fetch.max_wait_s)
        try:
            return again(self._follow, url, deadline)
        except (httpx.TransportError, RetryLater) as exc:
            tries = again.statistics.get("attempt_number", 1)
            last = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.TransportError) and str(exc) else \
                str(exc) or type(exc).__name__
            raise FetchError(f"download failed after {tries} tries within {self.s.fetch.deadline_s:g} s: {last}",
                             permanent=False) from None

    def _follow(self, url: str, deadline: float) -> bytes:
        """One try: each hop checked before it is asked for, the body read under the deadline."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = self.guard.check(url)
            except Refused as exc:
                raise FetchError(str(exc), permanent=True) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError(f"too slow: no answer within the {self.s.fetch.deadline_s:g} s deadline",
                                 permanent=False)
            with self._request(target, min(self.s.fetch.timeout_s, remaining)) as r:
                if r.is_redirect:  # the next hop is checked like the first
                    try:
                        url = str(httpx.URL(url).join(r.headers["location"]))
                    except httpx.InvalidURL:
                        raise FetchError(f"redirect to {shown(r.headers['location'])} refused: not a valid URL",
                                         permanent=True) from None
                    continue
                if r.status_code == 429 or r.status_code >= 500:
                    retry_after = r.headers.get("retry-after", "")
                    raise RetryLater(f"HTTP {r.status_code}", float(retry_after) if retry_after.isdigit() else None)
                if r.status_code >= 300:
                    raise FetchError(f"HTTP {r.status_code}", permanent=r.status_code in (401, 403, 404, 410) or
                                     r.status_code < 400)
                return self._read(r, deadline)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects (last: {shown(url)})", permanent=True)

    def _request(self, target: Target, timeout: float) -> AbstractContextManager[httpx.Response]:
        """The hop's GET, sent to the checked address under the host's name (Host header, TLS SNI and
        certificate check)."""
        return self._client(target.host).stream("GET", target.pinned_url, headers={"Host": target.host_header},
                                                timeout=httpx.Timeout(timeout),
                                                extensions={"sni_hostname": target.host})

    def _read(self, r: httpx.Response, deadline: float) -> bytes:
        """The body, as raw bytes (no decompression), stopped at the cap, the deadline or a rate too low. A read
        blocked at the deadline is cut there (its socket shut down), so the deadline holds whatever the host
        does; connecting and the headers are bounded by the request's timeouts, set to what is left of it."""
        cap, min_rate, grace = self.s.fetch.max_bytes, self.s.fetch.min_bytes_per_s, self.s.fetch.min_rate_after_s
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:  # a fair warning; the bytes read are what count
            raise FetchError(f"too large: {int(declared):,} bytes is over the {cap:,} allowed", permanent=True)
        too_slow = FetchError(f"too slow: not done within the {self.s.fetch.deadline_s:g} s deadline", permanent=False)
        buf = bytearray()
        start = time.monotonic()
        watchdog = _cut_at(r, deadline)
        try:
            for chunk in r.iter_raw():
                buf += chunk
                if len(buf) > cap:
                    raise FetchError(f"too large: over the {cap:,} bytes allowed", permanent=True)
                now = time.monotonic()
                if now > deadline:
                    raise too_slow
                if min_rate and now - start > grace and len(buf) / (now - start) < min_rate:
                    raise FetchError(f"too slow: {len(buf) / (now - start):,.0f} bytes/s is under the {min_rate:,} "
                                     "allowed", permanent=False)
        except httpx.TransportError:
            if time.monotonic() >= deadline:  # the watchdog cut it
                raise too_slow from None
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return bytes(buf)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def _cut_at(r: httpx.Response, deadline: float) -> threading.Timer | None:
    """A timer that shuts the response's socket down at ``deadline``, waking a read blocked on it (through
    httpcore's ``network_stream`` extension; the base socket's shutdown, which a TLS socket's reader survives
    with an error instead of a crash). None where the stream does not expose its socket."""
    stream = r.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return None

    def cut() -> None:
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    return timer

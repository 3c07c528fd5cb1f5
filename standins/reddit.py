"""A Reddit stand-in served on loopback: subreddit listings shaped like Reddit's (``/r/{sub}/top.json`` and,
with a bearer token from ``/api/v1/access_token``, ``/r/{sub}/top`` on the OAuth side), paginated by
``after``, and the images they link to. Faults: a 429 with Retry-After on a chosen listing page, a delay
per image, any status or bytes for an image. Every request is logged with its time and headers.

Hostile hosts too (``hostile()`` fills a listing with them): redirects anywhere, a body dripped a few bytes at
a time, a Content-Length that lies, a body with no length that never ends; and an "internal" server on
127.0.0.2 (another loopback address: ingest's allowed network in the tests is 127.0.0.1/32 alone) standing for
what must never be reached. Every request it sees is logged: a test asserts it saw none."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int] = (160, 120), fmt: str = "JPEG", quality: int = 90) -> bytes:
    """A smooth, distinct picture (a random low-resolution colour field, upscaled): its perceptual hash is
    stable under re-encoding and far from another seed's."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    im = small.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


@dataclass
class Served:
    status: int = 200
    body: bytes = b""
    content_type: str = "image/jpeg"
    delay_s: float = 0.0
    location: str | None = None  # a redirect (with status 302 unless another 3xx is set)
    drip_bytes: int = 0  # send the body this many bytes at a time...
    drip_s: float = 0.0  # ...this far apart
    claim_length: int | None = None  # the Content-Length to send, whatever the body's length
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    repeat: int = 1  # the body sent this many times over (an endless-looking stream)


@dataclass
class RedditStandin:
    client_id: str = "test-app"
    client_secret: str = "test-secret"
    listings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sub -> children's data, best first
    missing_subs: set[str] = field(default_factory=set)  # answer 404 (banned or private)
    files: dict[str, Served] = field(default_factory=dict)  # /i/{name} -> what it serves
    throttle_once: set[tuple[str, str]] = field(default_factory=set)  # (sub, after) answered 429 once
    retry_after_s: int = 1
    requests: list[dict[str, Any]] = field(default_factory=list)
    internal_requests: list[dict[str, Any]] = field(default_factory=list)  # what the internal server saw
    token: str = "tok-123"
    port: int = 0
    internal_port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def image_url(self, name: str) -> str:
        return f"{self.base}/i/{name}"

    def internal_url(self, path: str) -> str:
        return f"http://{INTERNAL_HOST}:{self.internal_port}{path}"

    def fetched(self, name: str) -> list[dict[str, Any]]:
        """The requests for image ``name``."""
        return [r for r in self.requests if r["path"] == f"/i/{name}"]

    def listing_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].startswith("/r/")]

    def _listing(self, sub: str, query: dict[str, list[str]]) -> dict[str, Any]:
        items = self.listings[sub]
        limit = int(query.get("limit", ["25"])[0])
        after = query.get("after", [None])[0]
        start = 0
        if after:
            ids = [f"t3_{d['id']}" for d in items]
            start = ids.index(after) + 1 if after in ids else len(items)
        page = items[start:start + limit]
        nxt = f"t3_{page[-1]['id']}" if page and start + limit < len(items) else None
        return {"kind": "Listing", "data": {"after": nxt, "dist": len(page),
                                            "children": [{"kind": "t3", "data": d} for d in page]}}


INTERNAL_HOST = "127.0.0.2"


class _Server(ThreadingHTTPServer):
    """The stand-in's server; stopping it stops its internal companion too."""

    daemon_threads = True
    companion: ThreadingHTTPServer | None = None

    def shutdown(self) -> None:
        super().shutdown()
        if self.companion is not None:
            self.companion.shutdown()

    def server_close(self) -> None:
        super().server_close()
        if self.companion is not None:
            self.companion.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up (ingest does that)
            super().handle_error(request, client_address)


def _internal(standin: RedditStandin) -> ThreadingHTTPServer:
    """What ingest must never reach: it logs every request and answers with a secret."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            standin.internal_requests.append({"method": "GET", "path": self.path, "t": time.monotonic()})
            body = b"internal secret: root:x:0:0"
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_HEAD = do_GET

    server = ThreadingHTTPServer((INTERNAL_HOST, standin.internal_port), Handler)
    server.daemon_threads = True
    standin.internal_port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve(standin: RedditStandin) -> tuple[ThreadingHTTPServer, threading.Thread]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers=headers)

        def _hostile(self, served: Served, log: dict[str, Any]) -> None:
            """A redirect, a drip, a lying or missing length; ``log`` gets the bytes sent and when it ended."""
            log["sent"] = 0
            if served.location is not None:
                self.send_response(served.status if 300 <= served.status < 400 else 302)
                self.send_header("Location", served.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                log["ended"] = time.monotonic()
                return
            body = served.body * served.repeat
            self.send_response(served.status)
            self.send_header("Content-Type", served.content_type)
            if not served.no_length:
                self.send_header("Content-Length", str(served.claim_length if served.claim_length is not None
                                                       else len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            step = served.drip_bytes or 65536
            try:
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    log["sent"] += len(body[i:i + step])
                    if served.drip_s:
                        time.sleep(served.drip_s)
            except (BrokenPipeError, ConnectionResetError):
                log["hung_up"] = True  # the client stopped reading: what a cap or a deadline does
            log["ended"] = time.monotonic()

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            url = urlparse(self.path)
            standin.requests.append({"method": "POST", "path": url.path, "t": time.monotonic(),
                                     "headers": dict(self.headers)})
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path != "/api/v1/access_token":
                return self._json(404, {"error": 404})
            want = "Basic " + base64.b64encode(f"{standin.client_id}:{standin.client_secret}".encode()).decode()
            if self.headers.get("Authorization") != want:
                return self._json(401, {"error": "invalid_client"})
            self._json(200, {"access_token": standin.token, "token_type": "bearer", "expires_in": 3600})

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            query = parse_qs(url.query)
            entry = {"method": "GET", "path": url.path, "query": query, "t": time.monotonic(), "headers": dict(self.headers)}
            standin.requests.append(entry)
            parts = url.path.strip("/").split("/")
            if parts[0] == "i" and len(parts) == 2:
                served = standin.files.get(parts[1])
                if served is None:
                    return self._json(404, {"error": 404})
                if served.delay_s:
                    time.sleep(served.delay_s)  # a slow image host, on the server's side
                if served.location is not None or served.drip_bytes or served.claim_length is not None \
                        or served.no_length or served.repeat > 1:
                    return self._hostile(served, entry)
                return self._send(served.status, served.body, served.content_type)
            if parts[0] == "r" and len(parts) == 3:
                sub, sort = parts[1], parts[2]
                oauth = not sort.endswith(".json")
                if oauth and self.headers.get("Authorization") != f"bearer {standin.token}":
                    return self._json(401, {"message": "Unauthorized", "error": 401})
                if sub in standin.missing_subs or sub not in standin.listings:
                    return self._json(404, {"message": "Not Found", "error": 404})
                key = (sub, query.get("after", [""])[0])
                if key in standin.throttle_once:
                    standin.throttle_once.discard(key)
                    return self._json(429, {"message": "Too Many Requests", "error": 429},
                                      headers={"Retry-After": str(standin.retry_after_s)})
                return self._json(200, standin._listing(sub, query),
                                  headers={"x-ratelimit-remaining": "99", "x-ratelimit-reset": "300"})
            self._json(404, {"error": 404})

    server = _Server(("127.0.0.1", standin.port), Handler)
    server.companion = _internal(standin)
    standin.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@contextmanager
def running() -> Iterator[RedditStandin]:
    """A stand-in served (with its internal server) for the block's length."""
    st = RedditStandin()
    server, _ = serve(st)
    try:
        yield st
    finally:
        server.shutdown()
        server.server_close()


def post(pid: str, url: str, *, sub: str = "memes", score: int = 5000, **extra: Any) -> dict[str, Any]:
    """A listing entry's ``data``, as Reddit shapes it for a link post."""
    return {"id": pid, "name": f"t3_{pid}", "title": f"post {pid}", "subreddit": sub, "author": f"u_{pid}",
            "permalink": f"/r/{sub}/comments/{pid}/post_{pid}/", "url": url, "url_overridden_by_dest": url,
            "score": score, "created_utc": 1_760_000_000.0 + int.from_bytes(pid.encode(), "big") % 86_400,
            "over_18": False, "is_video": False, "removed_by_category": None, **extra}


def gallery(pid: str, first: str, second: str, *, sub: str = "memes", score: int = 5000) -> dict[str, Any]:
    """A gallery post: no direct URL, its images in ``media_metadata`` in ``gallery_data`` order."""
    d = post(pid, f"https://www.reddit.com/gallery/{pid}", sub=sub, score=score)
    d.update(is_gallery=True, gallery_data={"items": [{"media_id": "m1", "id": 1}, {"media_id": "m2", "id": 2}]},
             media_metadata={"m2": {"status": "valid", "e": "Image", "m": "image/jpg",
                                    "s": {"u": second.replace("&", "&amp;"), "x": 160, "y": 120}},
                             "m1": {"status": "valid", "e": "Image", "m": "image/jpg",
                                    "s": {"u": first.replace("&", "&amp;"), "x": 160, "y": 120}}})
    return d


def hostile(st: RedditStandin) -> None:
    """r/memes as an attacker would write it, in pages of 4: ids that are no ids, a javascript: permalink,
    galleries and links that point at local files, links and redirects to internal hosts, a drip, a slow host,
    a Content-Length that lies, a body that never ends; then two good posts, after all of them."""
    u = st.image_url
    big = picture(900, size=(640, 480), quality=95)
    st.files = {
        "ok0.jpg": Served(body=picture(901)), "ok1.jpg": Served(body=picture(902)), "ok2.jpg": Served(body=picture(903)),
        "js1.jpg": Served(body=picture(904)), "gf1b.jpg": Served(body=picture(905)), "gp1b.jpg": Served(body=picture(906)),
        "to-internal.jpg": Served(location="http://metadata.google.internal/computeMetadata/v1/token.jpg"),
        "to-loopback.jpg": Served(location=st.internal_url("/secret.jpg"), status=301),
        "to-file.jpg": Served(location="file:///etc/passwd"),
        "drip.jpg": Served(body=big, drip_bytes=64, drip_s=0.1),  # 640 bytes/s
        "slow.jpg": Served(body=big * 4, drip_bytes=4000, drip_s=0.2),  # 20 KB/s: fast enough, but not done in time
        "stall.jpg": Served(body=big * 4, drip_bytes=5000, drip_s=1.9),  # fast enough, each read just under a timeout
        "liar.jpg": Served(body=big, claim_length=1000, repeat=100),  # says 1,000 bytes, sends megabytes
        "endless.jpg": Served(body=big, no_length=True, repeat=200),  # no length, megabytes
    }
    memes = [
        post("..", u("ok0.jpg")), post("x" * 300, u("ok0.jpg")), post("a\x00b", u("ok0.jpg")),
        post("js1", u("js1.jpg"), permalink="javascript:alert(document.cookie)"),
        gallery("gf1", "file:///etc/passwd", u("gf1b.jpg")), gallery("gp1", "/etc/passwd", u("gp1b.jpg")),
        post("fl1", "file:///etc/passwd.jpg"), post("in1", st.internal_url("/latest/meta-data.jpg")),
        post("rd1", u("to-internal.jpg")), post("rd2", u("to-loopback.jpg")), post("rd3", u("to-file.jpg")),
        post("drip", u("drip.jpg")), post("slow", u("slow.jpg")), post("liar", u("liar.jpg")),
        post("endless", u("endless.jpg")), post("ok1", u("ok1.jpg")), post("ok2", u("ok2.jpg")),
    ]
    for i, d in enumerate(memes):
        d["score"] = 9000 - i  # a top listing comes best first
    st.listings = {"memes": memes}

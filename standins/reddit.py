"""A Reddit stand-in served on loopback: subreddit listings shaped like Reddit's (``/r/{sub}/top.json`` and,
with a bearer token from ``/api/v1/access_token``, ``/r/{sub}/top`` on the OAuth side), paginated by
``after``, and the images they link to. Faults: a 429 with Retry-After on a chosen listing page, a delay
per image, any status or bytes for an image. Every request is logged with its time and headers."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
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
    token: str = "tok-123"
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def image_url(self, name: str) -> str:
        return f"{self.base}/i/{name}"

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
            standin.requests.append({"method": "GET", "path": url.path, "query": query, "t": time.monotonic(),
                                     "headers": dict(self.headers)})
            parts = url.path.strip("/").split("/")
            if parts[0] == "i" and len(parts) == 2:
                served = standin.files.get(parts[1])
                if served is None:
                    return self._json(404, {"error": 404})
                if served.delay_s:
                    time.sleep(served.delay_s)  # a slow image host, on the server's side
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

    server = ThreadingHTTPServer(("127.0.0.1", standin.port), Handler)
    server.daemon_threads = True
    standin.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


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

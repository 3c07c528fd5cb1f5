"""Where posts come from, behind one Protocol: Reddit listings, or a folder of images for offline use.

A source yields pages of posts; each page carries the cursor to resume from once all its posts are done,
so a run killed midway picks up at the first page it had not finished."""

from __future__ import annotations

import csv
import html
import json
import logging
import time
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from tenacity import RetryCallState

from pipeline.errors import InvalidRequest, Unavailable
from pipeline.ids import reddit_path
from pipeline.ingest.urls import DEFAULT_PORTS, Refused, check_form, shown
from pipeline.retry import RetryLater, last_error, retrying
from pipeline.settings import IngestSettings

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


@dataclass
class Post:
    """One image post. ``url`` is where its image came from; ``file`` is set by the folder source alone, and
    only a post with a ``file`` is read from disk (any other is fetched over http(s), checked)."""

    id: str
    url: str
    title: str = ""
    subreddit: str = ""
    permalink: str = ""
    author: str = ""
    score: int = 0
    created_utc: float = 0.0
    over_18: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # a folder's other metadata fields
    file: Path | None = None  # the folder source's image file

    def metadata(self) -> dict[str, Any]:
        base = {"title": self.title, "subreddit": self.subreddit, "permalink": self.permalink, "author": self.author,
                "score": self.score, "created_utc": self.created_utc, "over_18": self.over_18, "url": self.url}
        return {**self.extra, **{k: v for k, v in base.items() if v not in ("", None)}}


@dataclass
class Page:
    posts: list[Post]
    cursor: dict[str, Any]  # where to resume once every post of this page is done
    rejected: dict[str, str] = field(default_factory=dict)  # listing entries that are no image post: id -> why
    listed: int = 0  # entries the listing held


class Source(Protocol):
    name: str
    failures: dict[str, str]  # listing failures (a subreddit that could not be listed): recorded, never fatal

    def key(self) -> str:
        """What identifies this source's runs (a resumed run must be of the same source and settings)."""
        ...

    def pages(self, cursor: dict[str, Any] | None = None) -> Iterator[Page]: ...


# --- folder ---

class FolderSource:
    """A directory of images with optional metadata: ``<stem>.json`` sidecars, or ``manifest.json`` /
    ``manifest.csv`` / ``metadata.csv`` with a ``file`` column. The post id is the metadata's ``id``, else
    the file's stem."""

    name = "folder"

    def __init__(self, folder: Path | str, page_size: int = 64) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InvalidRequest(f"ingest folder {self.folder} does not exist or is not a directory")
        self.page_size = page_size
        self.failures: dict[str, str] = {}  # a folder has no listing to fail

    def key(self) -> str:
        return f"folder:{self.folder.resolve()}"

    def _manifest(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if (self.folder / "manifest.json").is_file():
            raw = json.loads((self.folder / "manifest.json").read_text())
            for e in raw.values() if isinstance(raw, dict) else raw:
                out[e["file"]] = dict(e)
        for name in ("manifest.csv", "metadata.csv"):
            if (self.folder / name).is_file():
                with open(self.folder / name, newline="") as fh:
                    for row in csv.DictReader(fh):
                        if row.get("file"):
                            out.setdefault(row["file"], {}).update({k: _csv_value(v) for k, v in row.items() if k})
        return out

    def posts(self) -> Iterator[Post]:
        manifest = self._manifest()
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
                continue
            meta = dict(manifest.get(path.name, {}))
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                meta.update(json.loads(sidecar.read_text()))
            meta.pop("file", None)
            known = {k: meta.pop(k) for k in ("title", "subreddit", "permalink", "author") if k in meta}
            yield Post(id=str(meta.pop("id", path.stem)), url=str(path), score=int(meta.pop("score", 0) or 0),
                       created_utc=float(meta.pop("created_utc", 0) or 0), over_18=_truthy(meta.pop("over_18", False)),
                       extra=meta, file=path, **{k: str(v) for k, v in known.items()})

    def pages(self, cursor: dict[str, Any] | None = None) -> Iterator[Page]:
        after = (cursor or {}).get("after")
        batch: list[Post] = []
        for post in self.posts():
            if after is not None and Path(post.url).name <= after:
                continue
            batch.append(post)
            if len(batch) == self.page_size:
                yield _page(batch, {"after": Path(batch[-1].url).name})
                batch = []
        if batch:
            yield _page(batch, {"after": Path(batch[-1].url).name})


def _page(batch: list[Post], cursor: dict[str, Any]) -> Page:
    """A folder's page: a post whose metadata names a permalink that is no reddit path is refused."""
    posts, rejected = [], {}
    for post in batch:
        if post.permalink:
            path = reddit_path(post.permalink)
            if path is None:
                rejected[post.id] = _bad_permalink(post.permalink)
                continue
            post.permalink = path
        posts.append(post)
    return Page(posts, cursor, rejected, listed=len(batch))


def _bad_permalink(link: object) -> str:
    return f"permalink {shown(str(link), 60)} refused: not a reddit path (/r/...)"


def _csv_value(v: str | None) -> Any:
    if v is None:
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _truthy(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


# --- reddit ---

def image_of(d: dict[str, Any], hosts: Collection[str] = ("i.redd.it", "i.imgur.com", "imgur.com", "preview.redd.it"),
             ports: Collection[int] = DEFAULT_PORTS) -> tuple[str | None, str]:
    """The image URL of a listing entry's ``data``, or None and why it is not an image post. Direct links
    only: an image file's extension, over http(s), on one of ``hosts`` (imgur.com/x.jpg goes to i.imgur.com);
    a gallery's first image over http(s) on one of ``hosts`` as well. Downloads check every hop again."""
    if d.get("removed_by_category") or d.get("title") in ("[removed]", "[deleted]") or d.get("removed"):
        return None, "removed"
    if d.get("is_gallery"):
        items = (d.get("gallery_data") or {}).get("items") or []
        media = d.get("media_metadata") or {}
        for it in items[:1]:  # a gallery is taken as its first image
            m = media.get(it.get("media_id"), {})
            src = (m.get("s") or {}).get("u") or (m.get("s") or {}).get("gif")
            if m.get("status", "valid") == "valid" and m.get("e", "Image") in ("Image", "AnimatedImage") and src:
                try:
                    check_form(html.unescape(str(src)), hosts, ports)
                except Refused as exc:
                    return None, f"gallery image {exc}"
                return html.unescape(str(src)), ""
        return None, "gallery without a usable first image"
    url = html.unescape(str(d.get("url_overridden_by_dest") or d.get("url") or ""))
    if d.get("is_video") or not url:
        return None, "not an image post"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return None, "not an image post"
    ext = Path(parts.path).suffix.lower()
    if ext not in IMAGE_EXTS:
        return None, "not an image post"
    try:
        check_form(url, hosts, ports)
    except Refused as exc:
        return None, str(exc)
    return (url.replace("//imgur.com/", "//i.imgur.com/") if host == "imgur.com" else url), ""


class RedditSource:
    """Reddit listings: app-only OAuth when credentials are set, the public JSON otherwise; pagination by
    ``after``; per-subreddit minimum score; ``Retry-After`` and the rate-limit headers honoured."""

    name = "reddit"

    def __init__(self, settings: IngestSettings, client: httpx.Client | None = None,
                 sleep: Any = time.sleep) -> None:
        self.s = settings
        self.subs = dict(settings.reddit.subreddits)
        # trust_env=False: no proxy variable or .netrc of the host's environment reaches Reddit's requests
        # gzip or nothing: the one encoding _capped_body inflates under its cap
        self.http = client or httpx.Client(timeout=settings.fetch.timeout_s, follow_redirects=True, trust_env=False,
                                           headers={"User-Agent": settings.fetch.user_agent,
                                                    "Accept-Encoding": "gzip"})
        self.sleep = sleep
        self._token: tuple[str, float] | None = None
        self.failures: dict[str, str] = {}  # listing failures by subreddit: recorded, never fatal

    @property
    def oauth(self) -> bool:
        return bool(self.s.reddit.client_id and self.s.reddit.client_secret)

    def key(self) -> str:
        subs = ",".join(f"{k}>={v}" for k, v in sorted(self.subs.items()))
        return f"reddit:{self.s.reddit.sort}:{self.s.reddit.period}:{subs}"

    def _bearer(self) -> str:
        if self._token and self._token[1] > time.monotonic() + 30:
            return self._token[0]
        assert self.s.reddit.client_id and self.s.reddit.client_secret
        r = self._send("POST", self.s.reddit.token_url, data={"grant_type": "client_credentials"},
                       auth=(self.s.reddit.client_id, self.s.reddit.client_secret.get_secret_value()))
        body = r.json()
        if "access_token" not in body:
            raise Unavailable(f"Reddit OAuth token request refused: {body.get('error', 'no token in the answer')}")
        self._token = (body["access_token"], time.monotonic() + float(body.get("expires_in", 3600)))
        return self._token[0]

    def _wait(self, seconds: float, why: str) -> None:
        seconds = min(max(seconds, 0.0), self.s.fetch.max_wait_s)
        if seconds > 0:
            log.info("reddit: waiting %.1f s (%s)", seconds, why)
            self.sleep(seconds)

    def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request with bounded retries: 429 and 5xx wait for Retry-After (or back off), timeouts retry."""
        tries = self.s.fetch.retries + 1
        why = {"last": ""}

        def note(state: RetryCallState) -> None:
            why["last"] = last_error(state)

        again = retrying((httpx.TransportError, RetryLater), attempts=tries, first_s=1.0, max_s=30.0,
                         server_wait_max_s=self.s.fetch.max_wait_s,
                         sleep=lambda seconds: self._wait(seconds, why["last"]), before_sleep=note)
        try:
            r = again(self._once, method, url, **kw)
        except (httpx.TransportError, RetryLater) as exc:
            last = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.TransportError) else str(exc)
            raise Unavailable(f"{method} {urlsplit(url).path}: gave up after {tries} tries ({last})") from None
        # spend the rate-limit budget evenly: out of requests, wait for the window to reset
        remaining, reset = r.headers.get("x-ratelimit-remaining"), r.headers.get("x-ratelimit-reset")
        if remaining is not None and reset is not None and float(remaining) < 1:
            self._wait(float(reset), "rate limit used up")
        return r

    def _once(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request, its body read up to ``reddit.max_listing_bytes`` (``_capped_body``), then Unavailable."""
        auth = kw.pop("auth", None)
        request = self.http.build_request(method, url, **kw)
        r = self.http.send(request, auth=auth, stream=True)
        try:
            if r.status_code == 429 or r.status_code >= 500:
                raise RetryLater(f"HTTP {r.status_code}", _retry_after(r))
            if r.status_code >= 400:
                raise Unavailable(f"{method} {urlsplit(url).path}: HTTP {r.status_code}")
            body = _capped_body(r, self.s.reddit.max_listing_bytes, f"{method} {urlsplit(url).path}")
        finally:
            r.close()
        headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(r.status_code, headers=headers, content=bytes(body), request=request)

    def listing(self, sub: str, after: str | None) -> dict[str, Any]:
        params = {"limit": str(self.s.reddit.page_size), "raw_json": "1"}
        if self.s.reddit.sort in ("top", "controversial"):
            params["t"] = self.s.reddit.period
        if after:
            params["after"] = after
        if self.oauth:
            url = f"{self.s.reddit.oauth_url}/r/{sub}/{self.s.reddit.sort}"
            r = self._send("GET", url, params=params, headers={"Authorization": f"bearer {self._bearer()}"})
        else:
            r = self._send("GET", f"{self.s.reddit.public_url}/r/{sub}/{self.s.reddit.sort}.json", params=params)
        body = r.json()
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise Unavailable(f"r/{sub}: the listing is not a Reddit listing")
        return body["data"]

    def _entry(self, d: dict[str, Any], sub: str) -> Post | str | None:
        """A listing entry as a post, or why it is refused, or None when it is under the minimum score."""
        score = int(d.get("score") or 0)
        if score < self.subs[sub]:
            return None
        url, why = image_of(d, self.s.fetch.image_hosts, self.s.fetch.allow_ports)
        if url is None:
            return why
        link = reddit_path(d.get("permalink"))
        if link is None:  # a listing that is not Reddit's own (a javascript: link): never stored
            return _bad_permalink(d.get("permalink"))
        return Post(id=str(d["id"]), url=url, title=str(d.get("title") or ""), subreddit=str(d.get("subreddit") or sub),
                    permalink=link, author=str(d.get("author") or ""), score=score,
                    created_utc=float(d.get("created_utc") or 0), over_18=bool(d.get("over_18")))

    def pages(self, cursor: dict[str, Any] | None = None) -> Iterator[Page]:
        subs = list(self.subs)
        start = subs.index(cursor["sub"]) if cursor and cursor.get("sub") in subs else 0
        for i, sub in enumerate(subs[start:], start):
            after = cursor.get("after") if cursor and i == start else None
            for page_no in range(self.s.reddit.max_pages):
                try:
                    data = self.listing(sub, after)
                except (Unavailable, ValueError) as exc:  # one subreddit failing never stops the run
                    self.failures[sub] = str(exc)
                    log.warning("reddit: r/%s: %s", sub, exc)
                    break
                posts: list[Post] = []
                rejected: dict[str, str] = {}
                below = False
                children = data.get("children") or []
                for child in children if isinstance(children, list) else []:
                    d = child.get("data") if isinstance(child, dict) else None
                    if not isinstance(d, dict) or d.get("id") in (None, ""):
                        continue
                    pid = str(d["id"])
                    try:
                        entry = self._entry(d, sub)
                    except (TypeError, ValueError) as exc:  # a malformed entry is that entry's problem alone
                        rejected[pid] = f"malformed listing entry: {type(exc).__name__}"
                        continue
                    if entry is None:
                        below = True
                    elif isinstance(entry, str):
                        rejected[pid] = entry
                    else:
                        posts.append(entry)
                after = data.get("after") if isinstance(data.get("after"), str) else None
                # top listings come best first: past the minimum score, later pages only hold lower ones
                done = not after or (below and self.s.reddit.sort == "top") or page_no + 1 == self.s.reddit.max_pages
                nxt = {"sub": subs[i + 1], "after": None} if done and i + 1 < len(subs) else \
                    {"sub": sub, "after": after} if not done else {"sub": None, "after": None}
                yield Page(posts, nxt, rejected, listed=len(children))
                if done:
                    break


def _capped_body(r: httpx.Response, cap: int, what: str) -> bytes:
    """A streamed response's body, inflated here under ``cap`` (httpx inflates a whole chunk at once: 64 KB of
    gzip can be 64 MiB), or Unavailable past the cap or in an encoding other than gzip."""
    encoding = r.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise Unavailable(f"{what}: the answer's encoding {ascii(encoding[:20])} is not taken")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    body = bytearray()
    try:
        for raw in r.iter_raw():
            data = raw
            while data:
                if inflate is None:
                    out, data = data, b""
                else:
                    out = inflate.decompress(data, cap + 1 - len(body))
                    data = inflate.unconsumed_tail
                body += out
                if len(body) > cap:
                    raise Unavailable(f"{what}: the answer is over {cap:,} bytes")
    except zlib.error as exc:
        raise Unavailable(f"{what}: the answer's gzip is corrupt ({exc})") from None
    return bytes(body)


def _retry_after(r: httpx.Response) -> float | None:
    v = r.headers.get("retry-after")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def make_source(settings: IngestSettings, name: str | None = None, folder: Path | str | None = None) -> Source:
    name = name or settings.ingest_source
    if name == "folder":
        path = folder or settings.ingest_folder
        if path is None:
            raise InvalidRequest("the folder source needs a folder (IMGSEARCH_INGEST_FOLDER or --folder)")
        return FolderSource(path)
    if name == "reddit":
        return RedditSource(settings)
    raise InvalidRequest(f"unknown ingest source {name!r}; valid: folder, reddit")

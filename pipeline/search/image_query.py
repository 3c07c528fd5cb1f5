"""An image query's picture: checked with ingest's guards, kept under its job in Redis, read back by the worker.

An upload or an ``image_url`` is hostile input like any listing: a URL is fetched under ingest's rules (http(s),
an allowed host, a public address, every redirect checked again, a deadline, the size cap counted on the bytes
read: ``pipeline.ingest.download``) and the bytes are decoded with ingest's guards (content sniffed, the
decompression-bomb guard before any pixel, a GIF's first frame: ``pipeline.ingest.images``), tightened for a
query: JPEG, PNG, WebP and GIF only (``QUERY_FORMATS``: the one plugin the content names opens it; a BMP, whose
RLE decoder is pure Python, or anything else is refused ``unsupported_format`` before any decoder runs), and a
decode that must fit ``image_query_decode_mib`` (a large JPEG is counted, and decoded, at its draft scale).
The API runs these checks (Pillow alone, no model) so a bad picture gets its 4xx at once; it keeps the normalised JPEG
ingest would store (longest side 1024, a few hundred KB at most) under the job, as long as its record
(``AsyncJobStore.keep_image``, ``JobStore.image``). The job carries only the picture's SHA-256: nothing pickled,
no bytes in the queue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.errors import InvalidRequest

# ingest's guards are imported where used: the ingest package (its ledger, sources and run) stays out of the API
# process until a picture comes


QUERY_FORMATS = ("jpeg", "png", "webp", "gif")  # as ``sniff`` names them


@dataclass(frozen=True)
class QueryImage:
    jpeg: bytes  # normalised as ingest stores an image
    sha256: str  # of ``jpeg``: what the job's params name (and the result cache keys on)


def check(data: bytes, settings: Any) -> QueryImage:
    """The picture in ``data`` normalised, or InvalidRequest: ``image_too_large`` (over the byte cap, the pixel
    cap, or the decode's memory budget), ``not_an_image`` (empty, HTML or XML), ``unsupported_format`` (any
    other content: a BMP, a TIFF, an unknown format) or ``bad_image`` (truncated or corrupt). CPU work: run it
    off an event loop."""
    from pipeline.ingest.images import BadImage, prepare, sniff

    if len(data) > settings.limits.max_upload_bytes:
        raise InvalidRequest(f"the image is {len(data):,} bytes; the limit is {settings.limits.max_upload_bytes:,}",
                             code="image_too_large")
    try:
        kind = sniff(data)
    except BadImage as exc:
        html = "HTML" in str(exc) or str(exc) == "empty file"
        raise InvalidRequest(f"{exc} (JPEG, PNG, WebP and GIF are taken)",
                             code="not_an_image" if html else "unsupported_format") from None
    if kind not in QUERY_FORMATS:
        raise InvalidRequest(f"a {kind.upper()} picture is not taken as a query (JPEG, PNG, WebP and GIF are)",
                             code="unsupported_format")
    try:
        prepared = prepare(data, settings.fetch.max_pixels, budget=settings.image_query_decode_mib << 20)
    except BadImage as exc:
        code = "image_too_large" if str(exc).startswith("image too large") else "bad_image"
        raise InvalidRequest(str(exc), code=code) from None
    return QueryImage(prepared.jpeg, hashlib.sha256(prepared.jpeg).hexdigest())


def fetch(url: str, settings: Any) -> bytes:
    """The bytes at ``url`` under ingest's rules, within ``image_query_fetch_s`` and ``limits.max_upload_bytes``, or
    InvalidRequest: ``url_refused`` (scheme, host, or an address that is not public, on any hop) or
    ``image_fetch_failed`` (the host's answer: an error status, too large, too slow). Blocking: run it in a
    thread."""
    from pipeline.ingest.download import Downloader, FetchError
    from pipeline.ingest.urls import Refused, UrlGuard

    try:
        UrlGuard(settings.fetch.image_hosts, settings.fetch.allow_networks, settings.fetch.allow_ports).check(url)
    except Refused as exc:
        raise InvalidRequest(f"{exc}; allowed hosts: {', '.join(settings.fetch.image_hosts)}",
                             code="url_refused") from None
    rules = settings.model_copy(update={"fetch": {"deadline_s": settings.image_query_fetch_s,
                                                  "max_bytes": settings.limits.max_upload_bytes, "retries": 0, "concurrency": 1}})
    downloader = Downloader(rules)
    try:
        return downloader.fetch(url)
    except FetchError as exc:
        code = "url_refused" if "refused" in exc.reason else "image_fetch_failed"
        raise InvalidRequest(f"image_url: {exc.reason}", code=code) from None
    finally:
        downloader.close()


def picture(data: bytes | None, sha256: str, max_pixels: int) -> Image.Image:
    """A job's kept picture (``JobStore.image``) as RGB, decoded again with the same guards (Redis is not a place
    to trust blindly), or InvalidRequest ``image_expired`` if it is gone or is not the one the job names."""
    from pipeline.ingest.images import BadImage, prepare

    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise InvalidRequest("the query image is no longer stored (the job expired); submit it again",
                             code="image_expired")
    try:
        return prepare(data, max_pixels).image
    except BadImage as exc:  # checked by the API: only a corrupted store gets here
        raise InvalidRequest(str(exc), code="bad_image") from None


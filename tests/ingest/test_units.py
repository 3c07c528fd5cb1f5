"""Ingest's pure parts: which listing entries are image posts, content sniffing and the image guards, the
perceptual hash, the checkpoint's page bookkeeping, and the beat schedule setting."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.images import BadImage, dhash, prepare, sniff
from pipeline.ingest.ledger import HashIndex
from pipeline.ingest.run import _Pages
from pipeline.ingest.sources import image_of
from standins.reddit import gallery, picture, post

pytestmark = pytest.mark.ingest


@pytest.mark.parametrize(("data", "url", "why"), [
    ({}, "https://i.redd.it/abc.jpg", ""),
    ({}, "https://i.imgur.com/abc.png", ""),
    ({}, "https://imgur.com/abc.gif", ""),
    ({}, "https://imgur.com/a/album", "not an image post"),
    ({}, "https://i.imgur.com/abc.gifv", "not an image post"),
    ({}, "https://v.redd.it/xyz", "not an image post"),
    ({}, "https://example.com/pic.jpg",
     "URL 'https://example.com/pic.jpg' refused: host 'example.com' is not an allowed image host"),
    ({"is_video": True}, "https://i.redd.it/abc.jpg", "not an image post"),
    ({"removed_by_category": "moderator"}, "https://i.redd.it/abc.jpg", "removed"),
    ({"title": "[deleted]"}, "https://i.redd.it/abc.jpg", "removed"),
])
def test_image_of_takes_direct_images_only(data, url, why) -> None:  # type: ignore[no-untyped-def]
    got, reason = image_of({**post("x", url), **data})
    assert reason == why
    assert (got is None) == bool(why)
    if got:
        assert got.replace("//imgur.com/", "//i.imgur.com/") == got or got.startswith("https://i.imgur.com/")


def test_a_gallery_is_its_first_image_unescaped() -> None:
    got, why = image_of(gallery("g", "https://preview.redd.it/one.jpg?width=640&s=abc", "https://preview.redd.it/two.jpg"))
    assert why == "" and got == "https://preview.redd.it/one.jpg?width=640&s=abc"
    broken = gallery("g", "https://preview.redd.it/one.jpg", "https://preview.redd.it/two.jpg")
    broken["media_metadata"]["m1"]["status"] = "failed"
    assert image_of(broken) == (None, "gallery without a usable first image")


@pytest.mark.parametrize(("data", "kind"), [(picture(1), "jpeg"), (picture(1, fmt="PNG"), "png"), (b"GIF89a....", "gif"),
                                            (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp")])
def test_sniff_reads_the_bytes_not_the_name(data: bytes, kind: str) -> None:
    assert sniff(data) == kind


@pytest.mark.parametrize(("data", "why"), [(b"", "empty"), (b"  <!doctype html><html>", "HTML"),
                                           (b"%PDF-1.7", "unknown content")])
def test_sniff_refuses_what_is_no_image(data: bytes, why: str) -> None:
    with pytest.raises(BadImage, match=why):
        sniff(data)


def test_prepare_guards_pixels_before_decoding_and_normalises() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(buf, format="PNG")
    with pytest.raises(BadImage, match="3000 x 2000 pixels is over the 5,000,000"):
        prepare(buf.getvalue(), max_pixels=5_000_000)
    p = prepare(buf.getvalue(), max_pixels=10_000_000)
    assert (p.width, p.height) == (3000, 2000) and max(p.image.size) == 1024 and p.image.mode == "RGB"
    assert Image.open(io.BytesIO(p.jpeg)).format == "JPEG"
    with pytest.raises(BadImage, match="corrupt"):
        prepare(picture(1)[:200], max_pixels=10_000_000)


def _bits(a: bytes, b: bytes) -> int:
    return int(np.bitwise_count(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def test_the_hash_keeps_reencodes_close_and_other_pictures_far() -> None:
    original = Image.open(io.BytesIO(picture(1)))
    buf = io.BytesIO()
    original.resize((100, 75)).save(buf, format="JPEG", quality=60)
    copy = Image.open(io.BytesIO(buf.getvalue()))
    others = [dhash(Image.open(io.BytesIO(picture(s)))) for s in range(2, 30)]
    assert _bits(dhash(original), dhash(copy)) <= 10
    assert min(_bits(dhash(original), o) for o in others) > 40
    index = HashIndex([], np.zeros((0, 4), np.uint64), max_distance=10)
    for i, h in enumerate(others):
        index.add(f"o{i}", h)
    assert index.match(dhash(copy)) is None
    index.add("orig", dhash(original))
    hit = index.match(dhash(copy))
    assert hit is not None and hit[0] == "orig"


def test_the_checkpoint_moves_only_past_pages_wholly_done() -> None:
    pages = _Pages()
    for seq, n in ((0, 2), (1, 1)):
        for _ in range(n):
            pages.add_item(seq)
        pages.close(seq, {"after": f"p{seq}"})
    pages.settle(1)  # page 1 is done, but page 0 is not
    assert not pages.advance() and pages.cursor is None
    pages.settle(0)
    pages.settle(0)
    assert pages.advance() and pages.cursor == {"after": "p1"}


def test_the_schedule_setting_takes_crontab_or_seconds() -> None:
    from celery.schedules import crontab

    from workers.celery_app import schedule

    assert schedule("30") == 30.0
    cron = schedule("15 6 * * 1")
    assert isinstance(cron, crontab) and cron.minute == {15} and cron.hour == {6} and cron.day_of_week == {1}
    with pytest.raises(ValueError, match="crontab"):
        schedule("every day")


def test_the_ledger_keeps_takedowns_final_and_ingested_posts_ingested(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.ingest.ledger import Ledger, LedgerRow

    ledger = Ledger(tmp_path)
    ledger.record([LedgerRow("a", "reddit", "ingested", "", False, None),
                   LedgerRow("b", "admin", "taken_down", "taken down", True, None)], "v1", "r1")
    ledger.record([LedgerRow("a", "reddit", "rejected", "removed", True, None),
                   LedgerRow("b", "reddit", "ingested", "", False, None)], "v1", "r2")
    assert (ledger.status("a") or {})["status"] == "ingested"  # gone from a listing later: still in the stores
    assert (ledger.status("b") or {})["status"] == "taken_down"
    ledger.record([LedgerRow("a", "admin", "taken_down", "taken down", True, None)], "", "takedown")
    assert (ledger.status("a") or {})["status"] == "taken_down"
    ledger.close()


@pytest.mark.parametrize(("url", "why"), [
    ("file:///etc/passwd", "scheme 'file'"), ("/etc/passwd", "no scheme"), ("ftp://i.redd.it/a.jpg", "scheme 'ftp'"),
    ("javascript:alert(1)", "scheme 'javascript'"), ("https://i.redd.it@evil.example/a.jpg", "credentials"),
    ("https://evil.example/a.jpg", "'evil.example' is not an allowed"), ("http://[::1/a.jpg", "not a valid URL"),
    ("https://i.redd.it:99999/a.jpg", "not a valid URL"),
    ("https://i.redd.it:6379/a.jpg", "port 6379"), ("http://i.redd.it:8080/a.jpg", "port 8080"),
])
def test_a_listing_url_is_http_on_an_allowed_host_or_refused(url: str, why: str) -> None:
    from pipeline.ingest.urls import Refused, check_form

    with pytest.raises(Refused, match=why):
        check_form(url, ["i.redd.it"])
    assert check_form("HTTPS://I.REDD.IT./a.jpg", ["i.redd.it"]) == ("https", "i.redd.it", 443)


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.2", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.2", "loopback"), ("10.1.2.3", "private"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "special-purpose (100.64.0.0/10)"), ("fe80::1", "link-local"),
    ("8.8.8.8", None), ("127.0.0.1", None), ("2606:4700::1111", None),
    # IANA's special-purpose ranges, whatever Python's is_global says of them, and the ones that embed IPv4
    ("192.0.0.8", "special-purpose (192.0.0.0/24)"), ("192.0.0.9", "special-purpose (192.0.0.0/24)"),
    ("192.88.99.1", "special-purpose (192.88.99.0/24)"), ("198.18.0.1", "private"), ("3fff::1", "special-purpose (3fff::/20)"),
    ("2002:7f00:1::", "special-purpose (6to4)"), ("2002:a9fe:a9fe::1", "special-purpose (6to4)"),
    ("64:ff9b::7f00:1", "reserved"), ("64:ff9b::a9fe:a9fe", "reserved"), ("64:ff9b:1::1", "reserved"),
    ("2001::1", "private"), ("2001:db8::1", "private"), ("5f00::1", "reserved"),
    ("192.31.196.1", "special-purpose (192.31.196.0/24)"),
])
def test_only_public_addresses_pass_unless_a_network_is_allowed(address: str, kind: str | None) -> None:
    import ipaddress

    from pipeline.ingest.urls import UrlGuard

    guard = UrlGuard(["x"], allow=["127.0.0.1/32"])
    assert guard.address_ok(ipaddress.ip_address(address)) == kind


def test_a_download_goes_to_the_checked_address_under_the_hosts_name() -> None:
    from pipeline.ingest.urls import Refused, UrlGuard

    target = UrlGuard(["127.0.0.1"], allow=["127.0.0.1/32"], ports=[8080]).check("http://127.0.0.1:8080/i/a.jpg?x=1#frag")
    assert (target.pinned_url, target.host_header) == ("http://127.0.0.1:8080/i/a.jpg?x=1", "127.0.0.1:8080")
    with pytest.raises(Refused, match="a loopback address"):  # the same host with no network allowed
        UrlGuard(["127.0.0.1"], ports=[8080]).check("http://127.0.0.1:8080/i/a.jpg")
    with pytest.raises(Refused, match="port 6379"):  # the network allowed, but not Redis's port
        UrlGuard(["127.0.0.1"], allow=["127.0.0.1/32"], ports=[8080]).check("http://127.0.0.1:6379/")


def test_listing_entries_pointing_anywhere_but_an_image_host_are_refused() -> None:
    assert "scheme 'file'" in image_of(gallery("g", "file:///etc/passwd", "https://i.redd.it/b.jpg"))[1]
    assert "no scheme" in image_of(gallery("g", "/etc/passwd", "https://i.redd.it/b.jpg"))[1]
    assert "is not an allowed" in image_of(gallery("g", "https://169.254.169.254/a.jpg", "https://i.redd.it/b.jpg"))[1]
    assert "scheme 'file'" in image_of(post("f", "file:///etc/passwd.jpg"))[1]


@pytest.mark.parametrize(("value", "ok"), [
    ("abc123", True), ("A_b-9", True), ("x" * 64, True), ("x" * 65, False), ("", False), ("..", False),
    ("a/b", False), ("a\x00b", False), ("abc\n", False), ("a b", False), ("é", False), (12, False),
])
def test_one_pattern_says_what_a_post_id_is(value: object, ok: bool) -> None:
    from pipeline.ids import is_post_id, refused_key

    assert is_post_id(value) is ok
    if not ok:
        assert not is_post_id(refused_key(value)) and refused_key(value) == refused_key(value)


@pytest.mark.parametrize(("link", "path"), [
    ("/r/memes/comments/1abc/a_title/", "/r/memes/comments/1abc/a_title/"),
    ("https://www.reddit.com/r/memes/comments/1abc/", "/r/memes/comments/1abc/"),
    ("javascript:alert(1)", None), ("https://evil.example/r/memes/comments/1abc/", None), ("//evil.example/r/x", None),
    ("/r/memes/comments/1abc/../../../u/x", None), ("/r/memes/comments/1abc/\njavascript:x", None), (None, None),
])
def test_a_permalink_is_a_reddit_path_or_nothing(link: object, path: str | None) -> None:
    from pipeline.ids import reddit_path

    assert reddit_path(link) == path

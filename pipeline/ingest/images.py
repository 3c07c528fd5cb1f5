"""Bytes to a normalised image, guarded: content sniffed (not trusted from the URL or the headers) and opened by
that format's plugin alone (Pillow is never left to guess: a JPEG with a PhotoCD block at 2048 stays a JPEG), a
decompression-bomb guard before any pixel is decoded, optionally a memory budget for the decode (the pixels the
decoder will make, after a JPEG's draft scaling, times what each costs in the decoded mode), a GIF's first
frame, one RGB JPEG kept per image, and a 256-bit difference hash for near-duplicate checks."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_SIDE = 1024  # the stored image's longest side; both towers see far less (512 and 384 px)

# what ``sniff`` names -> the one Pillow plugin that may open it
PLUGINS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP"}
# bytes per pixel a decoded image holds in each mode ("1" is a byte a pixel in memory); another mode counts 4
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3,
               "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
# WebP's decoder fills a buffer of its own that Pillow copies to bytes and then to the image: its pixels count 4 times
_FORMAT_FACTOR = {"WEBP": 4}
# and a few bytes a pixel more, whatever the format: the decoders' own buffers and the allocator's slack, as
# measured (bench.query_decode: the worst accepted file of each format peaks within the budget)
_SLACK_BYTES = 4


# a progressive JPEG's decoder keeps every DCT coefficient of the whole picture (2 bytes each, up to 3 full-size
# components), at full size whatever the draft scale
_PROGRESSIVE_BYTES = 6


def decode_cost(fmt: str, mode: str, pixels: int, full_pixels: int = 0, progressive: bool = False) -> int:
    """Bytes a decode to RGB holds at its peak: the decoded image (``pixels`` in ``mode``, more than once for a
    format whose decoder copies), its RGB copy beside it, some slack, and a progressive JPEG's coefficients (``full_pixels``: its
    size before the draft scale)."""
    return (pixels * (_MODE_BYTES.get(mode, 4) * _FORMAT_FACTOR.get(fmt, 1) + 3 + _SLACK_BYTES)
            + (full_pixels * _PROGRESSIVE_BYTES if progressive else 0))


_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"))


class BadImage(ValueError):
    """Content that is not an image we take; the reason is recorded with the item and is permanent."""


def sniff(data: bytes) -> str:
    """The image format from the first bytes, or BadImage naming what the bytes look like instead."""
    if not data:
        raise BadImage("empty file")
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<svg")):
        raise BadImage("not an image: the content is HTML/XML")
    raise BadImage("not an image: unknown content")


@dataclass
class Prepared:
    image: Image.Image  # RGB, longest side <= MAX_SIDE
    jpeg: bytes
    width: int  # the original's size
    height: int
    phash: bytes  # HASH_BYTES


HASH_BYTES = 32


def dhash(image: Image.Image) -> bytes:
    """Difference hash: 256 bits of 'is this pixel brighter than its right neighbour' on a 17x16 grey
    thumbnail. Re-encodes and resizes of one picture differ in a few bits; the 64-bit (9x8) classic also
    merges memes that share a template but not their text, which are different posts."""
    g = np.asarray(image.convert("L").resize((17, 16), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.packbits((g[:, 1:] > g[:, :-1]).reshape(-1)).tobytes()


def shrink_to_jpeg(rgb: Image.Image, max_side: int, quality: int) -> bytes:
    """``rgb`` shrunk (in place) to fit ``max_side``, as JPEG bytes."""
    rgb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def prepare(data: bytes, max_pixels: int, *, budget: int | None = None) -> Prepared:
    """``data`` as a normalised image, or BadImage. ``budget``: the bytes the decode may hold (``decode_cost``),
    checked from the header before any pixel is decoded ("image too large" past it)."""
    plugin = PLUGINS[sniff(data)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[plugin]) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > max_pixels:
                    raise BadImage(f"image too large: {w} x {h} pixels is over the {max_pixels:,} allowed")
                im.seek(0)  # a GIF's (or any animation's) first frame
                im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale where it can
                if budget is not None:  # the size and mode the decoder will make (a JPEG's after its draft)
                    progressive = plugin == "JPEG" and bool(im.info.get("progressive") or im.info.get("progression"))
                    cost = decode_cost(plugin, im.mode, im.size[0] * im.size[1], w * h, progressive)
                    if cost > budget:
                        raise BadImage(f"image too large: a {w} x {h} {plugin} in mode {im.mode} takes "
                                       f"{cost / 2**20:,.0f} MiB to decode; {budget / 2**20:,.0f} MiB is allowed")
                rgb = im.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image too large: {exc}") from None
    except Exception as exc:  # PIL raises many kinds for truncated or corrupt files
        raise BadImage(f"corrupt image: {type(exc).__name__}: {exc}") from None
    jpeg = shrink_to_jpeg(rgb, MAX_SIDE, 90)
    return Prepared(rgb, jpeg, w, h, dhash(rgb))

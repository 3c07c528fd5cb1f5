"""Bytes to a normalised image, guarded: content sniffed (not trusted from the URL or the headers), a
decompression-bomb guard before any pixel is decoded, a GIF's first frame, one RGB JPEG kept per image,
and a 256-bit difference hash for near-duplicate checks."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_SIDE = 1024  # the stored image's longest side; both towers see far less (512 and 384 px)

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


def prepare(data: bytes, max_pixels: int) -> Prepared:
    sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > max_pixels:
                    raise BadImage(f"image too large: {w} x {h} pixels is over the {max_pixels:,} allowed")
                im.seek(0)  # a GIF's (or any animation's) first frame
                im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale where it can
                rgb = im.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image too large: {exc}") from None
    except Exception as exc:  # PIL raises many kinds for truncated or corrupt files
        raise BadImage(f"corrupt image: {type(exc).__name__}: {exc}") from None
    jpeg = shrink_to_jpeg(rgb, MAX_SIDE, 90)
    return Prepared(rgb, jpeg, w, h, dhash(rgb))

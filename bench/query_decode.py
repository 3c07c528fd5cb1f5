"""What a query picture costs the API to check (``pipeline.search.image_query.check``): CPU seconds and peak memory of
the worst file each format may be and still be accepted, and of the hostile files the check refuses.

Each file is checked in a fresh Python process (Pillow imported first), so the figures are that one decode's:
CPU is the process's user + system time around the call, memory the growth of its peak RSS (VmHWM) over what it
held before the call. The worst accepted files sit at the decode budget (``image_query_decode_mib``) for their
format and mode, under the upload cap (10 MiB) and made as costly to decode as that allows (noise where it fits).

    python -m bench.query_decode            # every file, 3 runs each (the slowest run is printed)
    python -m bench.query_decode --quick    # 1 run each

Prints a table and the last line ``worst_accepted=<name> cpu_s=<s> peak_mib=<MiB>``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_CAP = 10 << 20


# --- hostile files (the test's too: tests/faults/test_hostile_queries.py) ---

def rle8_bmp(width: int = 6320, height: int = 6320) -> bytes:
    """A BMP compressed with RLE8 at ``width`` x ``height``: one 255-pixel run and an end-of-line a row, so a few
    bytes a row (about 26 KB); Pillow's RLE decoder is pure Python and would walk every pixel."""
    rows = b"".join(b"\xff\x07\x00\x00" for _ in range(height - 1)) + b"\xff\x07\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def pcd_as_jpeg() -> bytes:
    """A JPEG's first bytes, then a PhotoCD block at 2048: Pillow left to guess opens it as PCD when its JPEG
    plugin gives up."""
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head.ljust(2048, b"\x00") + b"PCD_IPI".ljust(2048, b"\x00") + bytes(96 * 2048)


def png(width: int, height: int, mode: str = "RGBA", noise_rows: int = 0, seed: int = 0) -> bytes:
    """A PNG built row by row (never the whole picture in memory): ``noise_rows`` rows of noise, the rest flat."""
    channels = {"RGBA": 4, "RGB": 3, "L": 1}[mode]
    color = {"RGBA": 6, "RGB": 2, "L": 0}[mode]
    rng = np.random.default_rng(seed)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, out, flat = zlib.compressobj(6), [], b"\x00" * (width * channels + 1)
    for y in range(height):
        row = b"\x00" + rng.integers(0, 256, width * channels, dtype=np.uint8).tobytes() if y < noise_rows else flat
        out.append(z.compress(row))
    out.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


def _noise(width: int, height: int, mode: str, seed: int = 1) -> Image.Image:
    channels = len(mode)
    small = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, channels), dtype=np.uint8)
    big = Image.fromarray(small.squeeze(), mode).resize((width, height), Image.Resampling.NEAREST)
    return big


def _saved(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def worst_accepted(budget: int) -> dict[str, Callable[[], bytes]]:
    """Per format, the largest picture ``budget`` takes, as costly as the upload cap lets it be."""
    from pipeline.ingest.images import decode_cost

    def side(fmt: str, mode: str, progressive: bool = False) -> int:
        per = decode_cost(fmt, mode, 1, 1, progressive)
        return math.isqrt(budget // per) - 1

    def png_rgba() -> bytes:
        s = side("PNG", "RGBA")
        return png(s, s, "RGBA", noise_rows=min(s, UPLOAD_CAP // (s * 4) - 8))  # noise up to the upload cap

    def jpeg_tall() -> bytes:  # one side just over the encoder's size: the draft can't scale it down
        w = 1025
        h = min(budget // decode_cost("JPEG", "RGB", 1) // w, 65000)
        return _saved(_noise(w, h, "RGB"), "JPEG", quality=75)

    def jpeg_progressive() -> bytes:
        s = side("JPEG", "RGB", progressive=True)
        return _saved(_noise(s, s, "RGB"), "JPEG", quality=95, progressive=True)

    def webp_rgba() -> bytes:
        s = side("WEBP", "RGBA")
        return _saved(_noise(s, s, "RGBA"), "WEBP", quality=80, method=0)

    def gif() -> bytes:
        s = side("GIF", "P")
        return _saved(_noise(s, s, "L").convert("P"), "GIF")

    return {"png-rgba": png_rgba, "jpeg-tall": jpeg_tall, "jpeg-progressive": jpeg_progressive,
            "webp-rgba": webp_rgba, "gif": gif}


def hostile() -> dict[str, Callable[[], bytes]]:
    return {"bmp-rle8-6320": rle8_bmp, "pcd-as-jpeg": pcd_as_jpeg,
            "png-rgba-6300": lambda: png(6300, 6300, "RGBA"),
            "jpeg-12mp": lambda: _saved(_noise(4000, 3000, "RGB"), "JPEG", quality=90)}


# --- one check in a fresh process ---

_CHILD = r"""
import json, resource, sys, time
from PIL import Image
from pipeline.settings import ApiSettings
from pipeline.search import image_query
from pipeline.errors import InvalidRequest
import numpy, pipeline.ingest.images, pipeline.ingest.download  # what check imports where used: before the baseline
import io
for fmt in ("PNG", "JPEG", "WEBP", "GIF"):  # each plugin loaded and run once: the figure is the decode's alone
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format=fmt)
    image_query.check(buf.getvalue(), ApiSettings())

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
data = sys.stdin.buffer.read()
s = ApiSettings(image_query_decode_mib=int(sys.argv[1]))
before, r0 = hwm(), resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
try:
    image_query.check(data, s)
    outcome = "accepted"
except InvalidRequest as exc:
    outcome = exc.code
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"outcome": outcome, "cpu_s": cpu, "wall_s": wall, "peak_mib": (hwm() - before) / 2**20}))
"""


def measure(data: bytes, budget_mib: int) -> dict[str, float | str]:
    """``image_query.check`` of ``data`` in a fresh process: outcome, CPU and wall seconds, peak RSS growth."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(budget_mib)], input=data, capture_output=True,
                         cwd=ROOT, timeout=300, check=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run per file")
    ap.add_argument("--budget-mib", type=int, default=64, help="image_query_decode_mib (64, the default)")
    args = ap.parse_args()
    runs = 1 if args.quick else 3
    print(f"# image_query.check, budget {args.budget_mib} MiB, slowest of {runs} run(s), a fresh process each")
    print(f"{'file':<20} {'bytes':>10} {'outcome':<20} {'cpu_s':>7} {'wall_s':>7} {'peak_mib':>9}")
    worst: tuple[str, dict[str, float | str]] | None = None
    files = {**worst_accepted(args.budget_mib << 20), **hostile()}
    for name, make in files.items():
        data = make()
        got = max((measure(data, args.budget_mib) for _ in range(runs)), key=lambda m: float(m["cpu_s"]))
        print(f"{name:<20} {len(data):>10,} {got['outcome']!s:<20} {float(got['cpu_s']):>7.3f} "
              f"{float(got['wall_s']):>7.3f} {float(got['peak_mib']):>9.1f}", flush=True)
        if got["outcome"] == "accepted" and (worst is None or float(got["peak_mib"]) > float(worst[1]["peak_mib"])):
            worst = (name, got)
    if worst is not None:
        print(f"worst_accepted={worst[0]} cpu_s={float(worst[1]['cpu_s']):.3f} "
              f"peak_mib={float(worst[1]['peak_mib']):.1f}")


if __name__ == "__main__":
    main()

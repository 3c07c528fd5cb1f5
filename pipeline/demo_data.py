"""A small generated image set for the demo and the tests: coloured shapes on plain backgrounds,
each with a caption as its title and Reddit-like metadata."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple[int, int, int], bg: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def write_demo_images(folder: Path | str, n: int = 48, *, seed: int = 0, size: int = 96) -> Path:
    """Write ``n`` PNG images with ``<id>.json`` sidecars into ``folder``; deterministic given ``seed``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    subs = ("memes", "dankmemes", "me_irl", "meirl")
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        bg = list(BACKGROUNDS)[rng.randrange(len(BACKGROUNDS))]
        post_id = f"demo{i:03d}"
        _draw(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng).save(folder / f"{post_id}.png")
        meta = {"id": post_id, "title": f"a {colour} {shape} on a {bg} background", "subreddit": subs[i % len(subs)],
                "created_utc": 1_700_000_000 + 3600 * i, "over_18": i % 8 == 5, "score": 800 + 10 * i,
                "permalink": f"/r/{subs[i % len(subs)]}/comments/{post_id}/"}
        (folder / f"{post_id}.json").write_text(json.dumps(meta))
    return folder

"""A small synthetic world: scenes of one to three objects with captions in several phrasings.

An object has a shape, colour, size and texture; a scene adds a background and either a position (one
object), a count (two or three alike), or a left/right relation between two different objects. The
held-out split holds every scene that contains one of a few colour-shape pairs never seen in training,
so it measures composition, not memory. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

DATA_VERSION = "world-1"
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40),
           "purple": (140, 60, 185), "orange": (245, 135, 30)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (125, 125, 125)}
SIZES = {"small": 0.13, "large": 0.24}  # radius as a fraction of the image side
TEXTURES = ("plain", "striped")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
COUNT_WORDS = {2: "two", 3: "three"}
# colour-shape pairs never shown in training: the held-out split is every scene that has one
HELD_OUT = {("red", "star"), ("green", "triangle"), ("blue", "cross"), ("yellow", "circle"), ("purple", "square"),
            ("orange", "star")}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    texture: str

    def words(self) -> str:
        texture = "striped " if self.texture == "striped" else ""
        return f"{self.size} {texture}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    position: str = ""  # one object
    count: int = 1  # two or three alike

    @property
    def held_out(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT for o in self.objects)

    def key(self) -> str:
        """What the scene's captions say: two scenes with the same key are the same answer."""
        objs = ",".join(f"{o.size}.{o.texture}.{o.colour}.{o.shape}" for o in self.objects)
        return f"{objs}|{self.background}|{self.position}|{self.count}"

    def captions(self) -> list[str]:
        """Every phrasing of this scene; each names every attribute the image shows."""
        bg = self.background
        if len(self.objects) == 2:
            a, b = (o.words() for o in self.objects)
            return [f"a {a} to the left of a {b} on a {bg} background",
                    f"a {b} to the right of a {a} on a {bg} background",
                    f"{bg} background with a {a} on the left and a {b} on the right",
                    f"on a {bg} background, a {a} left of a {b}"]
        o = self.objects[0]
        if self.count > 1:
            n = COUNT_WORDS[self.count]
            many = f"{o.size} {'striped ' if o.texture == 'striped' else ''}{o.colour} {_plural(o.shape)}"
            return [f"{n} {many} on a {bg} background", f"a {bg} background with {n} {many}",
                    f"there are {n} {many} on {bg}", f"{n} {many} against a {bg} background"]
        pos = "in the center" if self.position == "center" else f"at the {self.position}"
        return [f"a {o.words()} {pos} on a {bg} background", f"a {bg} background with a {o.words()} {pos}",
                f"there is a {o.words()} {pos} on {bg}", f"{pos}, a {o.words()} against a {bg} background"]


def perturb(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one thing changed: what a caption must get right (an object's attribute, the
    position, the count, the background, or, for two objects, their order or which colour goes with which
    shape). Its captions are the reranker's hardest negatives; none holds a held-out colour-shape pair."""
    o = scene.objects[0]
    options = [replace(scene, background=b) for b in BACKGROUNDS]
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    for field_, values in (("shape", SHAPES), ("colour", tuple(COLOURS)), ("texture", TEXTURES)):
        for v in values:
            objs = list(scene.objects)
            objs[i] = replace(obj, **{field_: v})
            options.append(replace(scene, objects=tuple(objs)))
    if len(scene.objects) == 2:
        a, b = scene.objects
        options += [replace(scene, objects=(b, a)),
                    replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))]
    elif scene.count > 1:
        options.append(replace(scene, count=5 - scene.count))
    else:
        options += [replace(scene, position=p) for p in POSITIONS]
        options.append(replace(scene, objects=(replace(o, size="small" if o.size == "large" else "large"),)))
    options = [x for x in options if x.key() != scene.key() and not x.held_out and len(set(x.objects)) == len(x.objects)]
    return rng.choice(options)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def random_scene(rng: random.Random) -> Scene:
    def obj() -> Obj:
        return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), rng.choice(TEXTURES))

    bg = rng.choice(list(BACKGROUNDS))
    kind = rng.random()
    if kind < 0.45:
        return Scene((obj(),), bg, position=rng.choice(list(POSITIONS)))
    if kind < 0.7:
        o = obj()
        return Scene((Obj(o.shape, o.colour, "small", o.texture),), bg, count=rng.choice((2, 3)))
    a, b = obj(), obj()
    while (b.shape, b.colour) == (a.shape, a.colour):
        b = obj()
    return Scene((Obj(a.shape, a.colour, "small", a.texture), Obj(b.shape, b.colour, "small", b.texture)), bg)


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fill)
    else:  # cross
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _draw_obj(im: Image.Image, o: Obj, cx: float, cy: float, r: float, bg: tuple[int, int, int]) -> None:
    layer = Image.new("L", im.size, 0)
    _shape(ImageDraw.Draw(layer), o.shape, cx, cy, r, 255)  # type: ignore[arg-type]
    im.paste(COLOURS[o.colour], mask=layer)
    if o.texture == "striped":  # background-coloured diagonal stripes through the shape
        stripes = Image.new("L", im.size, 0)
        sd = ImageDraw.Draw(stripes)
        step = max(4, int(r * 0.5))
        for x in range(-im.size[0], im.size[0] * 2, step):
            sd.line([(x, 0), (x + im.size[1], im.size[1])], fill=255, width=max(1, step // 3))
        im.paste(bg, mask=ImageChops.multiply(layer, stripes))  # stripes inside the shape only


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    bg = BACKGROUNDS[scene.background]
    im = Image.new("RGB", (size, size), bg)
    jitter = lambda: rng.uniform(-0.04, 0.04) * size  # noqa: E731
    if len(scene.objects) == 2:  # left and right halves
        for o, x in zip(scene.objects, (0.27, 0.73), strict=True):
            r = SIZES[o.size] * size
            _draw_obj(im, o, x * size + jitter(), rng.uniform(0.3, 0.7) * size, r, bg)
    elif scene.count > 1:  # alike, spread over the frame
        o = scene.objects[0]
        r = SIZES[o.size] * size
        slots = [(0.25, 0.27), (0.75, 0.27), (0.25, 0.73), (0.75, 0.73), (0.5, 0.5)]
        for x, y in rng.sample(slots, scene.count):
            _draw_obj(im, o, x * size + jitter(), y * size + jitter(), r, bg)
    else:
        o = scene.objects[0]
        x, y = POSITIONS[scene.position]
        _draw_obj(im, o, x * size + jitter(), y * size + jitter(), SIZES[o.size] * size, bg)
    return im


def object_box(scene: Scene, size: int, rng: random.Random) -> tuple[float, float, float, float]:
    """Where ``render(scene, size, rng)`` draws a one-object scene's object: its bounding box (x0, y0, x1, y1) in
    pixels, replaying the same draws of ``rng`` (the jitter of its centre)."""
    if len(scene.objects) != 1 or scene.count != 1:
        raise ValueError("object_box: a scene of one object at a position")
    x, y = POSITIONS[scene.position]
    cx, cy = x * size + rng.uniform(-0.04, 0.04) * size, y * size + rng.uniform(-0.04, 0.04) * size
    r = SIZES[scene.objects[0].size] * size
    return cx - r, cy - r, cx + r, cy + r


@dataclass(frozen=True)
class Item:
    scene: Scene
    seed: int  # the rendering's own seed: the image is render(scene, size, Random(seed))

    def image(self, size: int) -> Image.Image:
        return render(self.scene, size, random.Random(self.seed))

    def box(self, size: int) -> tuple[float, float, float, float]:
        """The bounding box of a one-object scene's object in ``image(size)``."""
        return object_box(self.scene, size, random.Random(self.seed))


def make_split(n: int, *, held_out: bool, seed: int, unique: bool = False) -> list[Item]:
    """``n`` items of the training world (no held-out pair) or of the held-out one; ``unique``: no two
    items share a caption key (an evaluation gallery where each caption has exactly one right image)."""
    rng = random.Random(f"{DATA_VERSION}:{seed}:{held_out}")
    out: list[Item] = []
    seen: set[str] = set()
    while len(out) < n:
        scene = random_scene(rng)
        if scene.held_out != held_out:
            continue
        if unique:
            if scene.key() in seen:
                continue
            seen.add(scene.key())
        out.append(Item(scene, rng.randrange(2**31)))
    return out


def write_images(folder: Path | str, items: list[Item], *, size: int = 64, prefix: str = "w") -> list[str]:
    """Write each item as ``<prefix><i>.png`` with a Reddit-like ``.json`` sidecar (its first caption as the
    title) for the folder ingest; returns the post ids in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subs = ("memes", "dankmemes", "me_irl", "meirl")
    ids = []
    for i, it in enumerate(items):
        post_id = f"{prefix}{i:04d}"
        it.image(size).save(folder / f"{post_id}.png")
        meta = {"id": post_id, "title": it.scene.captions()[0], "subreddit": subs[i % len(subs)],
                "created_utc": 1_700_000_000 + 3600 * i, "over_18": False, "score": 800 + 10 * i,
                "permalink": f"/r/{subs[i % len(subs)]}/comments/{post_id}/"}
        (folder / f"{post_id}.json").write_text(json.dumps(meta))
        ids.append(post_id)
    return ids

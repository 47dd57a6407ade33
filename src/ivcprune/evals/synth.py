"""Procedural referring-expression grounding data (deterministic by seed).

Each sample is an image with several objects (shape x colour x size) on a noisy, cluttered background,
a referring expression that singles out one object, and that object's box in pixels. Expressions need
appearance ("the red circle"), appearance plus size ("the small blue square"), relations to another
object ("the red circle left of the green triangle") or order ("the second star from the top"); the
generator only emits an expression when it identifies exactly one object in the scene.

Splits are disjoint by construction: sample ``i`` of split ``s`` is drawn from the random stream
seeded with ``(seed, split, i)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 448
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SIZES = {"small": (48, 72), "large": (88, 128)}
SPLITS = {"train": 0, "val": 1, "test": 2}
ORDINALS = ("first", "second", "third")
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
SIDES = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}  # axis, direction
PROMPT = "Locate {ref} in the image and output its bbox coordinates in JSON format."


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    frame: tuple[int, int, int, int]  # the square the shape is drawn in: x1, y1, x2, y2

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box of the drawn shape, in pixels (x2, y2 exclusive)."""
        return _tight_box(self.shape, self.frame)

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.frame[0] + self.frame[2]) / 2, (self.frame[1] + self.frame[3]) / 2


@dataclass
class Sample:
    id: str
    image: Image.Image
    ref: str  # referring expression, e.g. "the red circle"
    kind: str  # attribute | size | relation | ordinal
    box: tuple[int, int, int, int]
    objects: list[Obj] = field(default_factory=list)

    @property
    def question(self) -> str:
        return PROMPT.format(ref=self.ref)

    @property
    def target(self) -> Obj:
        return next(o for o in self.objects if o.box == self.box)

    @property
    def answer(self) -> str:
        return format_answer(self.box, self.target.label)


def format_answer(box, label: str | None = None) -> str:
    """Qwen2.5-VL's grounding answer: a JSON object with ``bbox_2d`` (and, as Qwen2.5-VL does, a ``label``;
    here the label comes first, so that the object is named before its box is written)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    head = f'"label": "{label}", ' if label else ""
    return f'{{{head}"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"ivcprune-synth/{seed}/{split}/{index}")


def _place(rng: random.Random, objs: list[Obj], side: int) -> tuple[int, int, int, int] | None:
    margin = 6
    for _ in range(60):
        x1 = rng.randint(margin, IMAGE_SIZE - margin - side)
        y1 = rng.randint(margin, IMAGE_SIZE - margin - side)
        box = (x1, y1, x1 + side, y1 + side)
        if all(_gap(box, o.frame) >= 10 for o in objs):
            return box
    return None


def _gap(a, b) -> float:
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return max(dx, dy)


def _polygon(shape: str, box) -> list[tuple[float, float]] | None:
    x1, y1, x2, y2 = box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    return None


def _tight_box(shape: str, box) -> tuple[int, int, int, int]:
    pts = _polygon(shape, box)
    if pts is None:
        return tuple(int(v) for v in box)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (int(math.floor(min(xs))), int(math.floor(min(ys))), int(math.ceil(max(xs))), int(math.ceil(max(ys))))


def _lighting() -> np.ndarray:
    """The fixed lighting of this synthetic world, over the whole image (objects included): redder to the
    left, greener to the top, bluer to the bottom (+-15 levels). Like the sky above and the ground below
    in photographs, it makes absolute position visible in the pixels."""
    ramp = np.linspace(-0.5, 0.5, IMAGE_SIZE, dtype=np.float32)
    light = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    light[..., 0] -= 30 * ramp[None, :]
    light[..., 1] -= 30 * ramp[:, None]
    light[..., 2] += 30 * ramp[:, None]
    return light


_LIGHT = _lighting()


def draw_shape(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    """Draw object ``o`` filled with ``fill`` (used for the picture and for masks)."""
    x1, y1, x2, y2 = o.frame
    if o.shape == "circle":
        d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif o.shape == "square":
        d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        d.polygon(_polygon(o.shape, o.frame), fill=fill)


def render(objs: list[Obj], rng: random.Random) -> Image.Image:
    """Background colour + pixel noise + grey clutter strokes, then the objects, under the world's lighting."""
    base = np.array([rng.randint(170, 245) for _ in range(3)], dtype=np.float32)
    nrng = np.random.default_rng(rng.getrandbits(32))
    arr = base + nrng.normal(0, rng.uniform(4, 14), (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 14)):  # clutter: thin grey strokes and dots, never an object
        g = rng.randint(90, 160)
        x, y = rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE)
        if rng.random() < 0.5:
            d.line((x, y, x + rng.randint(-40, 40), y + rng.randint(-40, 40)), fill=(g, g, g), width=rng.randint(1, 2))
        else:
            s = rng.randint(2, 5)
            d.ellipse((x, y, x + s, y + s), fill=(g, g, g))
    for o in objs:
        rgb = tuple(int(np.clip(c + rng.randint(-18, 18), 0, 255)) for c in COLORS[o.color])
        draw_shape(d, o, rgb)
    lit = np.asarray(img, dtype=np.float32) + _LIGHT
    return Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))


def _desc(o: Obj, with_size: bool = False) -> str:
    return f"the {o.size + ' ' if with_size else ''}{o.color} {o.shape}"


def _same(objs, o, keys):
    return [p for p in objs if all(getattr(p, k) == getattr(o, k) for k in keys)]


def _relation_ok(t: Obj, lm: Obj, rel: str) -> bool:
    dx, dy = RELATIONS[rel]
    (tx, ty), (lx, ly) = t.center, lm.center
    if dx:
        return (tx - lx) * dx > 25 and abs(ty - ly) < abs(tx - lx)
    return (ty - ly) * dy > 25 and abs(tx - lx) < abs(ty - ly)


def _expressions(objs: list[Obj], t: Obj) -> dict[str, str]:
    """All unambiguous expressions for target ``t``, by kind."""
    out: dict[str, str] = {}
    if len(_same(objs, t, ("color", "shape"))) == 1:
        out["attribute"] = _desc(t)
    elif len(_same(objs, t, ("color", "shape", "size"))) == 1:
        out["size"] = _desc(t, with_size=True)
    twins = _same(objs, t, ("color", "shape"))
    if len(twins) > 1:
        for lm in objs:
            if lm is t or len(_same(objs, lm, ("color", "shape"))) != 1:
                continue
            for rel in RELATIONS:
                if _relation_ok(t, lm, rel) and not any(_relation_ok(o, lm, rel) for o in twins if o is not t):
                    out["relation"] = f"{_desc(t)} {rel} {_desc(lm)}"
                    break
            if "relation" in out:
                break
    same_shape = _same(objs, t, ("shape",))
    if len(same_shape) >= 2:
        for side, (axis, direction) in SIDES.items():
            key = [o.center[axis] * direction for o in same_shape]
            order = sorted(range(len(same_shape)), key=lambda i: key[i])
            rank = [same_shape[i] for i in order].index(t)
            gaps = sorted(key)
            # only when the order is visually clear (centres at least 20 px apart)
            if rank < len(ORDINALS) and all(b - a >= 20 for a, b in zip(gaps, gaps[1:])):
                plural = "from the " + side
                out["ordinal"] = f"the {ORDINALS[rank]} {t.shape} {plural}"
                break
    return out


KIND_WEIGHTS = {"attribute": 0.35, "size": 0.15, "relation": 0.25, "ordinal": 0.25}


def check_confusers(confusers: float) -> None:
    if not 0.0 <= confusers <= 1.0:
        raise ValueError(f"confusers must be in [0, 1], got {confusers!r}")


def make_sample(seed: int, split: str, index: int, render_image: bool = True, confusers: float = 0.0) -> Sample:
    """Sample ``index`` of ``split`` (``train`` / ``val`` / ``test``) for generator seed ``seed``.

    ``render_image=False`` skips drawing (``image`` is ``None``) when only the text is needed.
    ``confusers`` (training data only; the benchmark splits use 0): the probability that an object that is
    not a twin takes the colour of an object already placed, with another shape, so that a model has to
    read shapes, not colours alone, to tell the objects apart (hard negatives). At 0 the stream of random
    draws is the default's, sample for sample."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    check_confusers(confusers)
    rng = _rng(seed, split, index)
    want = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    for _attempt in range(50):
        objs: list[Obj] = []
        n = rng.randint(3, 6)
        while len(objs) < n:
            if objs and want in ("size", "relation", "ordinal") and rng.random() < 0.5:
                src = rng.choice(objs)  # a twin of an existing object makes position or size necessary
                shape = src.shape
                color = src.color if want != "ordinal" or rng.random() < 0.5 else rng.choice(list(COLORS))
                size = rng.choice(list(SIZES)) if want == "size" else src.size
            elif confusers and objs and rng.random() < confusers:
                src = rng.choice(objs)
                shape = rng.choice([s for s in SHAPES if s != src.shape])
                color, size = src.color, rng.choice(list(SIZES))
            else:
                shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
            side = rng.randint(*SIZES[size])
            box = _place(rng, objs, side)
            if box is None:
                break
            objs.append(Obj(shape, color, size, box))
        if len(objs) < 3:
            continue
        candidates = [(o, _expressions(objs, o)) for o in objs]
        wanted = [(o, e[want]) for o, e in candidates if want in e]
        if not wanted:
            continue
        target, ref = rng.choice(wanted)
        image = render(objs, rng) if render_image else None
        return Sample(id=f"{split}-{index}", image=image, ref=ref, kind=want, box=target.box, objects=objs)
    raise RuntimeError(f"could not build a {want!r} sample for {split}/{index}")


def make_split(seed: int, split: str, n: int, start: int = 0):
    for i in range(start, start + n):
        yield make_sample(seed, split, i)

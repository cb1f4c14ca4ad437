"""The synthetic dataset's "hard" preset: the images of the batch-size study (benchmarks/study.py).

    python -m hvdet.data.synthetic data/synthetic_hard --preset hard --train 1024 --val 128
    make_synthetic_coco("data/synthetic_hard", preset="hard")

The default "shapes" preset is learnt in a hundred iterations, too fast to tell optimizers apart.
This one is built so that a detector's AP keeps rising over a longer schedule:

* 10 classes that only shape separates: every object's colour comes from one palette shared by all
  classes, and pairs differ in a detail (disc / ring and square / frame: filled or outlined; disc /
  ellipse and square / bar: aspect; square / diamond: rotation; triangle, star, cross);
* 1-12 objects per image, sides 4-60% of the image, log-uniform (as many 5-10 px objects as
  20-40 px ones); most are COCO "small" (< 32^2 px) at 128 px;
* objects overlap (a box may cover up to half of a smaller one) and later ones hide earlier ones:
  an annotation's mask is its *visible* part (an RLE), its bbox and area come from that mask, and
  an object with too little left visible is not annotated;
* clutter: 0-8 unlabelled distractors (irregular blobs, strokes, specks) in the same colours;
* a textured background in a random colour (smooth noise, stripes or a gradient) plus pixel noise.

Each image draws from the generator its caller seeds per image, so the preset is deterministic.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ("disc", "ring", "square", "frame", "triangle", "star", "cross", "ellipse", "diamond", "bar")
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
PALETTE = np.array([(215, 50, 45), (45, 190, 60), (50, 70, 215), (225, 205, 40), (200, 60, 200),
                    (40, 200, 210), (240, 140, 30), (235, 235, 235), (30, 30, 30)], np.float64)
COLOUR_JITTER = 25
MIN_CONTRAST = 80.0  # RGB distance from the background under the object; else the farthest colour
SIDE_FRACTION = (0.04, 0.6)  # object side / image side, drawn log-uniform
MAX_COVER = 0.5  # a new box may cover at most this fraction of a placed box, and vice versa
PLACEMENT_TRIES = 30
MIN_VISIBLE_PX = 12  # an object with fewer visible pixels, or less than MIN_VISIBLE_FRACTION of
MIN_VISIBLE_FRACTION = 0.4  #   its own shape left visible, is not annotated (its pixels stay: clutter)
MAX_DISTRACTORS = 8
NOISE_STD = (4.0, 12.0)
CIRCLE_VERTICES = 48


def draw_hard_image(rng: np.random.Generator, image_size: int, max_objects: int = 12) -> tuple[np.ndarray, list]:
    """One image (uint8 HxWx3) and its annotated objects: category_id, mask (visible part), rle,
    bbox (xywh), area. Objects are listed in drawing order (later ones lie on top)."""
    pixels = _background(rng, image_size)
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        _paint(rng, pixels, _distractor(rng, image_size))
    drawn, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category_id = int(rng.integers(1, len(SHAPES) + 1))
        side = image_size * math.exp(rng.uniform(*np.log(SIDE_FRACTION)))
        box = _place(rng, side, image_size, boxes)
        if box is None:
            continue
        mask = _shape(SHAPES[category_id - 1], box[0] + side / 2, box[1] + side / 2, side, rng, image_size)
        if mask.any():
            _paint(rng, pixels, mask)
            boxes.append(box)
            drawn.append((category_id, mask))
    pixels += rng.normal(0.0, rng.uniform(*NOISE_STD), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), _visible_objects(drawn)


def _visible_objects(drawn: list) -> list[dict]:
    """Each object's mask minus those drawn after it; objects with too little left are dropped."""
    covered = np.zeros_like(drawn[0][1]) if drawn else None
    objects = []
    for category_id, mask in reversed(drawn):  # the last one drawn is wholly visible
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area < max(MIN_VISIBLE_PX, MIN_VISIBLE_FRACTION * mask.sum()):
            continue
        rle = mask_utils.encode(np.asfortranarray(visible))
        objects.append({"category_id": category_id, "mask": visible,
                        "rle": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(area)})
    return objects[::-1]


def _place(rng, side: float, image_size: int, boxes: list) -> tuple[float, float, float] | None:
    """(x, y, side) of a box inside the image that covers at most MAX_COVER of any placed box and
    is covered at most that much by each: overlaps happen, total occlusion does not."""
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.uniform(0, image_size - side, size=2)
        if all(_intersection(x, y, side, *b) <= MAX_COVER * min(side, b[2]) ** 2 for b in boxes):
            return float(x), float(y), float(side)
    return None


def _intersection(x, y, s, bx, by, bs) -> float:
    return max(0.0, min(x + s, bx + bs) - max(x, bx)) * max(0.0, min(y + s, by + bs) - max(y, by))


# ---------------------------------------------------------------------------------------------
# Shapes: each fits the square of side ``side`` around (cx, cy) whatever its rotation
# ---------------------------------------------------------------------------------------------

def _shape(name: str, cx: float, cy: float, side: float, rng, n: int) -> np.ndarray:
    """The boolean mask (n x n) of one object, rasterized by pycocotools as every mask here is."""
    r, turn = side / 2, rng.uniform(0, 2 * math.pi)
    if name in ("disc", "ring"):
        disc = _polygon_mask(_ellipse(cx, cy, r, r, 0.0), n)
        hole = r * rng.uniform(0.5, 0.7)
        return disc if name == "disc" else _hollow(disc, _polygon_mask(_ellipse(cx, cy, hole, hole, 0.0), n))
    if name in ("square", "frame"):
        square = _polygon_mask(_rectangle(cx, cy, r, r, 0.0), n)
        hole = r * rng.uniform(0.45, 0.65)
        return square if name == "square" else _hollow(square, _polygon_mask(_rectangle(cx, cy, hole, hole, 0.0), n))
    if name == "triangle":
        return _polygon_mask(_radial(cx, cy, [r] * 3, turn), n)
    if name == "star":
        return _polygon_mask(_radial(cx, cy, [r, r * rng.uniform(0.38, 0.5)] * 5, turn), n)
    if name == "cross":
        return _polygon_mask(_cross(cx, cy, r, rng.uniform(0.28, 0.4), turn), n)
    if name == "ellipse":
        return _polygon_mask(_ellipse(cx, cy, r, r * rng.uniform(0.4, 0.6), turn), n)
    if name == "diamond":  # a square standing on its corner, slightly stretched: a rhombus
        return _polygon_mask(_radial(cx, cy, [r, r * rng.uniform(0.7, 0.9)] * 2, math.pi / 2), n)
    aspect = rng.uniform(0.25, 0.33)  # bar: a 3-4:1 rectangle at any angle, corners on the circle of radius r
    half = r / math.hypot(1.0, aspect)
    return _polygon_mask(_rectangle(cx, cy, half, half * aspect, turn), n)


def _ellipse(cx, cy, a, b, turn) -> np.ndarray:
    angles = np.arange(CIRCLE_VERTICES) * 2 * math.pi / CIRCLE_VERTICES
    return _rotate(np.stack([a * np.cos(angles), b * np.sin(angles)], axis=1), cx, cy, turn)


def _rectangle(cx, cy, half_w, half_h, turn) -> np.ndarray:
    return _rotate(np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]]), cx, cy, turn)


def _radial(cx, cy, radii: list[float], turn) -> np.ndarray:
    """Vertices at equal angles and the given radii: [r]*3 a triangle, [r, r_in]*5 a star."""
    radii = np.asarray(radii, np.float64)
    angles = np.arange(len(radii)) * 2 * math.pi / len(radii)
    return _rotate(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), cx, cy, turn)


def _cross(cx, cy, r, width, turn) -> np.ndarray:
    """A plus sign whose arms are ``width`` times as wide as they are long; its outer corners lie
    on the circle of radius r."""
    arm = r / math.hypot(1.0, width)  # half the length of an arm pair
    h = width * arm  # half an arm's width
    quarter = [(arm, -h), (arm, h), (h, h), (h, arm)]  # one arm and the corner before the next
    corners = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter]
    return _rotate(np.array(corners), cx, cy, turn)


def _rotate(points: np.ndarray, cx: float, cy: float, turn: float) -> np.ndarray:
    c, s = math.cos(turn), math.sin(turn)
    return points @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _polygon_mask(points: np.ndarray, n: int) -> np.ndarray:
    flat = [round(float(v), 2) for v in points.reshape(-1)]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], n, n))).astype(bool)


def _hollow(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """An outline; at a few pixels the hole may close, and then it is the filled shape: small
    rings look like discs, as far-away ones do in photos."""
    ring = outer & ~inner
    return ring if ring.any() else outer


# ---------------------------------------------------------------------------------------------
# Background, clutter and colour
# ---------------------------------------------------------------------------------------------

def _background(rng, n: int) -> np.ndarray:
    """A random colour with one texture: smooth noise, stripes or a linear gradient (float HxWx3)."""
    base = rng.uniform(40, 215, size=3)
    kind = int(rng.integers(0, 3))
    yy, xx = np.mgrid[0:n, 0:n] / n
    if kind == 0:  # smooth noise: a coarse random grid, bilinearly upsampled per channel
        grid = rng.uniform(-45, 45, size=(3, *(2 * [int(rng.integers(3, 9))])))
        texture = np.stack([np.asarray(Image.fromarray(g.astype(np.float32)).resize((n, n), Image.BILINEAR))
                            for g in grid], axis=-1)
    elif kind == 1:  # stripes at a random angle and frequency, in a random colour direction
        turn, cycles = rng.uniform(0, math.pi), rng.uniform(3, 12)
        wave = np.sin(2 * math.pi * cycles * (xx * math.cos(turn) + yy * math.sin(turn)) + rng.uniform(0, 2 * math.pi))
        texture = wave[..., None] * rng.uniform(-35, 35, size=3)
    else:  # a gradient from one colour to another across a random direction
        turn = rng.uniform(0, 2 * math.pi)
        ramp = (xx - 0.5) * math.cos(turn) + (yy - 0.5) * math.sin(turn)
        texture = ramp[..., None] * rng.uniform(-90, 90, size=3)
    return base + texture


def _distractor(rng, n: int) -> np.ndarray:
    """An unlabelled shape that is none of the classes: an irregular blob, a stroke or a speck."""
    kind, cx, cy = int(rng.integers(0, 3)), *rng.uniform(0, n, size=2)
    if kind == 0:
        k = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        radii = n * rng.uniform(0.03, 0.15) * rng.uniform(0.5, 1.0, size=k)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    elif kind == 1:
        half_len, half_width = n * rng.uniform(0.1, 0.3), rng.uniform(0.5, 1.2)
        points = _rectangle(cx, cy, half_len, half_width, rng.uniform(0, math.pi))
    else:
        points = _ellipse(cx, cy, *(2 * [rng.uniform(1.0, 2.0)]), 0.0)
    return _polygon_mask(np.clip(points, 0, n), n)


def _paint(rng, pixels: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` with a palette colour that stands out from what lies under it."""
    under = pixels[mask].mean(axis=0) if mask.any() else pixels.mean(axis=(0, 1))
    order = rng.permutation(len(PALETTE))  # a random colour among those that contrast
    distances = np.linalg.norm(PALETTE[order] - under, axis=1)
    contrasting = np.flatnonzero(distances >= MIN_CONTRAST)
    pick = order[contrasting[0]] if contrasting.size else order[int(np.argmax(distances))]
    pixels[mask] = PALETTE[pick] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)

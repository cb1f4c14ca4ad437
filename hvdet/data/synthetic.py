"""A deterministic synthetic detection dataset in COCO format: coloured shapes on a noisy background.

    paths = make_synthetic_coco("data/synthetic", num_train=512, num_val=128, image_size=128, seed=0)
    python -m hvdet.data.synthetic data/synthetic --train 512 --val 128 --size 128 --seed 0
    python -m hvdet.data.synthetic data/synthetic_hard --preset hard     # the batch-size study's images

Writes ``OUT/train/*.png``, ``OUT/val/*.png`` and ``OUT/annotations/instances_{train,val}.json``
(the COCO 2017 layout), so everything downstream reads it exactly like COCO.

Two presets. ``hard`` (:mod:`hvdet.data.synthetic_hard`: 10 classes, small and overlapping objects,
clutter, texture) is made for the batch-size study. ``shapes``, the default, is built to be
*learnable in minutes on a CPU* (the demo's goal is box AP@[.5:.95] >= 0.5):

* three classes, each a shape with its own colour family (red circles, green squares, blue
  triangles), so shape and colour both separate them; the background is low-saturation grey;
* 1-4 objects per image, each 15-50% of the image side, never overlapping (placement is
  re-drawn until boxes are 2 px apart), so every object is fully visible and its mask exact;
* the pixels painted are exactly pycocotools' rasterization of the polygon written to the JSON,
  and ``bbox`` / ``area`` are computed from that mask, so boxes are tight to the pixel.

Determinism: each image draws from its own generator seeded by ``(seed, split, index)`` and PNG
is lossless with no timestamps, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from hvdet.data import synthetic_hard

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# RGB centre of each class's colour family; each object jitters it by up to +-COLOUR_JITTER.
COLOURS = {1: (215, 50, 45), 2: (45, 200, 60), 3: (50, 70, 215)}
COLOUR_JITTER = 30
OBJECT_SIDE_FRACTION = (0.15, 0.5)  # object size as a fraction of the image side
MIN_GAP_PX = 2  # boxes of one image stay this far apart: no occlusion, exact masks
PLACEMENT_TRIES = 50  # per object; an object that does not fit after this is left out
NOISE_STD = 8.0  # Gaussian pixel noise over the whole image
CIRCLE_VERTICES = 48
SPLITS = {"train": 0, "val": 1}
PRESETS = ("shapes", "hard")
DEFAULT_MAX_OBJECTS = {"shapes": 4, "hard": 12}


def make_synthetic_coco(out_dir, num_train: int = 512, num_val: int = 128, image_size: int = 128,
                        seed: int = 0, max_objects: int | None = None, masks: bool = True,
                        preset: str = "shapes") -> dict:
    """Write the train and val splits under ``out_dir``; return their paths.

    Returns ``{"train_images", "train_ann", "val_images", "val_ann"}`` (strings). ``masks=False``
    leaves ``segmentation`` out of the annotations (a boxes-only dataset). ``max_objects`` defaults
    to the preset's (shapes 4, hard 12).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    max_objects = DEFAULT_MAX_OBJECTS[preset] if max_objects is None else max_objects
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got train={num_train}, val={num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    out = Path(out_dir)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        paths[f"{split}_images"], paths[f"{split}_ann"] = _write_split(
            out, split, count, image_size, seed, max_objects, masks, preset)
    return {k: str(v) for k, v in paths.items()}


def _write_split(out: Path, split: str, count: int, image_size: int, seed: int, max_objects: int,
                 masks: bool, preset: str) -> tuple[Path, Path]:
    image_dir, ann_file = out / split, out / "annotations" / f"instances_{split}.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    draw = synthetic_hard.draw_hard_image if preset == "hard" else draw_image
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        pixels, objects = draw(rng, image_size, max_objects)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                   "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0}
            if masks:  # hard: the visible part of an occluded shape is no polygon, so an RLE
                ann["segmentation"] = obj["rle"] if "rle" in obj else [obj["polygon"]]
            annotations.append(ann)
    dataset = {"info": _info(preset, split, seed), "licenses": [], "images": images, "annotations": annotations,
               "categories": synthetic_hard.CATEGORIES if preset == "hard" else CATEGORIES}
    ann_file.write_text(json.dumps(dataset, separators=(",", ":")))
    return image_dir, ann_file


def _info(preset: str, split: str, seed: int) -> dict:
    if preset == "shapes":  # as before presets existed: the default files stay byte-identical
        return {"description": "hvdet synthetic shapes", "split": split, "seed": seed, "version": "1"}
    return {"description": f"hvdet synthetic {preset}", "preset": preset, "split": split, "seed": seed, "version": "1"}


def draw_image(rng: np.random.Generator, image_size: int, max_objects: int = 4) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HxWx3) and its objects: category_id, polygon, bbox (xywh), area, mask."""
    grey = rng.uniform(90, 170)
    tint = rng.uniform(-12, 12, size=3)  # low saturation: no background pixel looks like a class colour
    pixels = np.empty((image_size, image_size, 3), np.float64)
    pixels[:] = grey + tint
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        side_px = rng.uniform(*OBJECT_SIDE_FRACTION) * image_size
        origin = _place(rng, side_px, image_size, boxes)
        if origin is None:
            continue
        polygon = [round(float(v), 2) for v in _polygon(category_id, *origin, side_px, rng)]
        mask = _rasterize(polygon, image_size)
        rle = mask_utils.encode(np.asfortranarray(mask))
        colour = np.array(COLOURS[category_id]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
        pixels[mask.astype(bool)] = colour
        boxes.append((origin[0], origin[1], side_px))
        objects.append({"category_id": category_id, "polygon": polygon, "mask": mask,
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle))})
    pixels += rng.normal(0.0, NOISE_STD, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def _place(rng, side_px: float, image_size: int, boxes: list) -> tuple[float, float] | None:
    """Top-left corner for a ``side_px`` square that keeps MIN_GAP_PX from every placed box."""
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.uniform(0, image_size - side_px, size=2)
        if all(x + side_px + MIN_GAP_PX <= bx or bx + bs + MIN_GAP_PX <= x or
               y + side_px + MIN_GAP_PX <= by or by + bs + MIN_GAP_PX <= y for bx, by, bs in boxes):
            return float(x), float(y)
    return None


def _polygon(category_id: int, x: float, y: float, side_px: float, rng) -> list[float]:
    """Flat [x1, y1, x2, y2, ...] outline inside the square (x, y, side_px)."""
    if category_id == 1:  # circle
        r = side_px / 2
        angles = np.arange(CIRCLE_VERTICES) * 2 * math.pi / CIRCLE_VERTICES
        points = np.stack([x + r + r * np.cos(angles), y + r + r * np.sin(angles)], axis=1)
    elif category_id == 2:  # axis-aligned square
        points = np.array([[x, y], [x + side_px, y], [x + side_px, y + side_px], [x, y + side_px]])
    else:  # triangle, apex up or down
        apex_y, base_y = (y, y + side_px) if rng.random() < 0.5 else (y + side_px, y)
        points = np.array([[x + side_px / 2, apex_y], [x + side_px, base_y], [x, base_y]])
    return points.reshape(-1).tolist()


def _rasterize(polygon: list[float], image_size: int) -> np.ndarray:
    """pycocotools' rasterization of ``polygon``: the very mask a reader of the JSON will get."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], image_size, image_size))
    return mask_utils.decode(rle)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hvdet.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=512, help="number of training images")
    parser.add_argument("--val", type=int, default=128, help="number of validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=PRESETS, default="shapes",
                        help="shapes: the demo's 3 easy classes; hard: 10 classes, small, overlapping "
                             "objects, clutter and texture (the batch-size study's)")
    parser.add_argument("--max-objects", type=int, default=None, help="per image (default: shapes 4, hard 12)")
    parser.add_argument("--masks", action=argparse.BooleanOptionalAction, default=True,
                        help="write segmentations (default; polygons, RLEs for hard) or boxes only (--no-masks)")
    args = parser.parse_args(argv)
    paths = make_synthetic_coco(args.out_dir, args.train, args.val, args.size, args.seed, args.max_objects,
                                args.masks, args.preset)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

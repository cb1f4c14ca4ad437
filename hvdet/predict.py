"""``hvdet predict``: a checkpoint's detections on your own images, drawn and as COCO results.

    hvdet predict --checkpoint runs/demo --images data/synthetic/val --out runs/demo/predict --score 0.5

For each image (PNG or JPEG; a folder is read non-recursively, in sorted name order) it writes
``OUT/<stem>.png`` with the boxes of score >= ``--score``, their class names and scores drawn, and
``OUT/detections.json`` holding every detection the model returned (its own threshold applies, not
``--score``, so the file scores with COCOeval as ``--eval-only`` does) in COCO's results format:
``[{"image_id", "file_name", "category_id", "bbox": [x, y, w, h], "score"}]``, boxes in pixels of
the original image. Image ids count the files from 1, or are those of ``--ann FILE`` (a COCO
annotation file listing the images by ``file_name``).

The model is built as ``--eval-only`` builds it (:func:`hvdet.builders.build_inference_model`, one
process, CPU or this machine's GPU), from the recipe stored in the checkpoint: it is the config of
the run that wrote those weights, while ``config.yaml`` beside ``checkpoints/`` is rewritten by a
resume with other overrides. ``--config RECIPE`` replaces it and is required for a file holding a
plain state_dict; ``key=value`` overrides apply to either (e.g. ``data.root=...`` when the dataset
moved). The test-time resize is the recipe's (the model's transform), and the number of classes,
their names and category ids come from the recipe's ``data.val_ann``, as for evaluation.

Errors are one line naming the file. Exit 2: usage or config (no image found, no recipe, a missing
annotation file, an output that would overwrite an input); exit 1: an unusable checkpoint, an image
that cannot be decoded (the run stops there and writes no JSON: a results file silently missing
images would score as misses), a failed write.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from hvdet import checkpoint
from hvdet.atomic import atomic_write
from hvdet.builders import build_dataset, build_inference_model
from hvdet.config import Config, apply_override, from_dict, load_config
from hvdet.data.coco import DataError, load_coco_json
from hvdet.errors import HvdetError
from hvdet.eval.coco import to_coco_detections
from hvdet.exit_codes import EXIT_CONFIG
from hvdet.run import check_model_fits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESULTS_FILE = "detections.json"
# One colour per class (category index modulo the list): saturated, so boxes stand out on photos.
PALETTE = [(255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 128, 0), (0, 255, 0), (255, 0, 0),
           (0, 128, 255), (128, 0, 255), (255, 0, 128), (128, 255, 0)]


class UsageError(HvdetError, ValueError):
    """The command cannot do what was asked (exit 2); the message names the argument or file."""

    exit_code = EXIT_CONFIG  # like argparse's own usage errors


def find_images(path: str | Path) -> list[Path]:
    """The PNG/JPEG file ``path``, or those directly in the folder ``path``, sorted by name."""
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"--images {path}: no {'/'.join(IMAGE_SUFFIXES)} file in this folder "
                             "(subfolders are not read)")
        return images
    if not path.is_file():
        raise UsageError(f"--images {path} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--images {path} is not a {'/'.join(IMAGE_SUFFIXES)} file")
    return [path]


def output_paths(images: list[Path], out_dir: str | Path) -> list[Path]:
    """``OUT/<stem>.png`` for each image; refuses two inputs with one output, or overwriting an input."""
    outputs, seen = [Path(out_dir) / f"{p.stem}.png" for p in images], {}
    inputs = {p.resolve() for p in images}
    for image, out in zip(images, outputs, strict=True):
        if out.name in seen:
            raise UsageError(f"{seen[out.name]} and {image} would both be drawn to {out}; predict them separately")
        if out.resolve() in inputs:
            raise UsageError(f"--out {out_dir} would overwrite the input image {out}; choose another --out")
        seen[out.name] = image
    return outputs


def image_ids(images: list[Path], ann: str | None) -> list[int]:
    """1, 2, ... in file order; or the ids that the COCO annotation file ``ann`` gives the file names."""
    if ann is None:
        return list(range(1, len(images) + 1))
    try:
        by_name = {Path(i["file_name"]).name: i["id"] for i in load_coco_json(ann)["images"]}
    except FileNotFoundError as err:
        raise UsageError(f"--ann: {err}") from None
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise UsageError(f"--ann {ann} lists no image named {missing[0]} ({len(missing)} of {len(images)} missing)")
    return [by_name[p.name] for p in images]


def load_recipe(stored: dict | None, source: Path, config_path: str | None, overrides: Sequence[str]) -> Config:
    """``--config`` if given, else the config stored in the checkpoint ``source``; overrides applied."""
    if config_path is not None:
        return load_config(config_path, overrides)
    if stored is None:
        raise UsageError(f"{source} holds a plain state_dict without the run's config: pass --config RECIPE")
    raw = copy.deepcopy(stored)
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=f"the config stored in {source}")


def build_predictor(cfg: Config, weights: dict, stored: dict | None, source: Path):
    """The eval-mode detector holding ``weights`` and the recipe's val set (class count, names, ids)."""
    # The checkpoint's weights replace the whole model: a pretrained backbone file need not be present.
    cfg.model.pretrained_backbone = None
    try:
        dataset = build_dataset(cfg, train=False)
    except FileNotFoundError as err:
        raise UsageError(f"{err}: the class names and ids come from the recipe's data.val_ann; "
                         "point at it with data.root=... (or --config)") from None
    model = build_inference_model(cfg, dataset.num_classes, world_size=1)
    check_model_fits({"model": weights, "config": stored or {}}, source, model, cfg)
    model.load_state_dict(weights)
    return model.eval(), dataset


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # decodes the whole file: truncation shows up here
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode image file {path}: {err}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def line_width(image: torch.Tensor) -> int:
    """Box outline in pixels: 2 up to 600 px images, thicker on larger ones."""
    return max(2, round(max(image.shape[-2:]) / 300))


def draw(image: torch.Tensor, output: dict, names: dict[int, str], score: float) -> torch.Tensor:
    """``image`` with the boxes of score >= ``score`` drawn, the best on top (drawn last)."""
    keep = (output["scores"] >= score).nonzero().flatten()
    keep = keep[output["scores"][keep].argsort()]
    if len(keep) == 0:
        return image
    labels, scores = output["labels"][keep].tolist(), output["scores"][keep].tolist()
    text = [f"{names[c]} {s:.2f}" for c, s in zip(labels, scores, strict=True)]
    return draw_bounding_boxes(image, output["boxes"][keep], labels=text, width=line_width(image),
                               colors=[PALETTE[(c - 1) % len(PALETTE)] for c in labels])


def write_png(image: torch.Tensor, path: Path) -> None:
    array = image.permute(1, 2, 0).contiguous().numpy()
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), binary=True)


def predict(checkpoint_path: str, images_path: str, out_dir: str, score: float = 0.5, config_path: str | None = None,
            overrides: Sequence[str] = (), ann: str | None = None, progress: bool | None = None) -> dict:
    """Detect, draw and write every image; returns a summary. The cheap checks come first: a wrong
    path fails before the checkpoint is read or the model built."""
    images = find_images(images_path)
    outputs = output_paths(images, out_dir)
    ids = image_ids(images, ann)
    source = checkpoint.resolve(checkpoint_path)
    weights, stored = checkpoint.model_and_config(source)
    cfg = load_recipe(stored, source, config_path, overrides)
    model, dataset = build_predictor(cfg, weights, stored, source)
    names = {label: dataset.coco.cats[cat]["name"] for label, cat in dataset.contiguous_to_cat_id.items()}
    device = next(model.parameters()).device
    results, drawn = [], 0
    # progress None: a bar only on a terminal (tqdm's rule), so piped stderr keeps one-line errors
    for path, out, image_id in tqdm(list(zip(images, outputs, ids, strict=True)), desc="predict", unit="image",
                                    disable=None if progress is None else not progress):
        image = read_image(path)
        with torch.inference_mode():
            output = {k: v.cpu() for k, v in model([image.to(device, torch.float32) / 255])[0].items()}
        write_png(draw(image, output, names, score), out)
        drawn += int((output["scores"] >= score).sum())
        results += [{"image_id": d["image_id"], "file_name": path.name, "category_id": d["category_id"],
                     "bbox": d["bbox"], "score": d["score"]}
                    for d in to_coco_detections(output, image_id, dataset.contiguous_to_cat_id)]
    json_path = Path(out_dir) / RESULTS_FILE
    atomic_write(json_path, lambda f: f.write("[" + ",\n ".join(json.dumps(d) for d in results) + "]\n"))
    return {"images": len(images), "detections": len(results), "drawn": drawn, "score": score,
            "checkpoint": str(source), "results": str(json_path), "device": str(device)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvdet predict", description="Draw a checkpoint's detections on images "
                                "and write them as COCO results (OUT/<stem>.png, OUT/detections.json).")
    p.add_argument("--checkpoint", required=True, help="an hvdet checkpoint, a run's output_dir (its newest), "
                   "or a plain state_dict file (needs --config)")
    p.add_argument("--images", required=True, help="a PNG/JPEG file or a folder of them (not recursive)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--score", type=float, default=0.5, help="draw boxes of at least this score (default 0.5); "
                   "the JSON holds every detection")
    p.add_argument("--config", help="a recipe instead of the config stored in the checkpoint")
    p.add_argument("--ann", help="a COCO annotation file whose image ids the JSON uses (default: 1, 2, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.root=/data/coco")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # a usage error exits 2
    try:
        s = predict(args.checkpoint, args.images, args.out, args.score, args.config, args.overrides, args.ann)
    except HvdetError as err:  # usage, config (exit 2); checkpoint, data, write (exit 1): one line naming the file
        print(f"hvdet predict: {err.one_line()}", file=sys.stderr, flush=True)
        return err.exit_code
    print(f"{s['images']} images, {s['detections']} detections ({s['drawn']} drawn at score >= {s['score']:g}) "
          f"on {s['device']} -> {s['results']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

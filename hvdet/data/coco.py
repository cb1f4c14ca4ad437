"""COCO-format detection datasets: COCO 2017, Objects365, Open Images converted to COCO JSON, synthetic.

    ds = CocoDetection("data/coco/val2017", "data/coco/annotations/instances_val2017.json",
                       transforms=build_transforms(train=False), with_masks=True)
    image, target = ds[0]   # FloatTensor[3,H,W] in [0,1]; boxes xyxy px, labels 1..K, image_id, masks

The annotation file is checked once, from the JSON alone, when the dataset is made; images are
checked when they are read. What is an error and what is skipped:

* errors (:class:`DataError`, or ``FileNotFoundError`` for a missing file), each naming the file and,
  for an annotation, its id and image file: malformed JSON (with line/column), missing top-level
  keys, duplicate image or annotation ids, an annotation of an unknown image or an unknown
  category, a non-finite, zero-area or negative box, or one wholly outside its image, a polygon of
  fewer than 3 points, a missing ``segmentation`` when masks are asked for, a missing or
  undecodable image file, an image whose size differs from the JSON's ``width``/``height``;
* skipped: crowd annotations (``iscrowd=1``) are left out of the training targets, as in
  torchvision's and Detectron2's COCO readers; pycocotools still uses them as "ignore" regions in
  evaluation, through :attr:`CocoDetection.coco`;
* repaired: boxes that stick out of the image (rounding in COCO's own annotations) are clipped to
  it; a missing ``iscrowd`` reads as 0 and a missing ``area`` as the box area, the defaults
  COCOeval needs;
* kept: images without annotations (negatives); torchvision's detectors take empty targets.

``skip_invalid_boxes=True`` (``data.skip_invalid_boxes``) turns the box errors (non-finite, zero or
negative width or height, wholly outside the image) into drops: such annotations are left out of
training *and* of the evaluation ground truth, counted per reason in :attr:`CocoDetection.skipped_boxes`
(:func:`skipped_boxes_line` is its one-line report). A ``bbox`` that is not four numbers stays an error.

Other formats (:mod:`hvdet.data.voc`, :mod:`hvdet.data.lvis`) subclass :class:`CocoDetection`: they
override :meth:`CocoDetection._read` to produce the same COCO dict, and inherit the checks, the
image reading and the evaluation ground truth. An image or annotation entry may carry a ``source``
string (VOC: its XML file), which the messages then name.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torchvision.transforms.v2 import functional as F

from hvdet.errors import HvdetError

MAX_REPORTED = 5  # problems listed in one error message; the count says how many more
# Reasons a box is invalid (the keys of CocoDetection.skipped_boxes["reasons"]).
NOT_FINITE, NOT_POSITIVE, OUTSIDE = "not finite", "zero or negative size", "outside the image"


class DataError(HvdetError, ValueError):
    """A dataset file is malformed; the message names the file (and annotation) at fault."""


def load_coco_json(ann_file) -> dict:
    """Parse a COCO instances file; a missing file or malformed JSON is an error naming it."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} "
                        f"(char {err.pos}): {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text at byte {err.start}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"{path}: not a COCO instances file, missing top-level key(s) {missing}")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset; see the module docstring for what is checked.

    Attributes: ``coco`` (pycocotools COCO of the annotation file, the evaluation ground truth),
    ``contiguous_to_cat_id`` ({1..K: category id}), ``num_classes`` (K + 1 for background),
    ``aspect_ratios`` (width / height per image, from the JSON), ``ids`` (image ids, sorted),
    ``skipped_boxes`` ({} or, with ``skip_invalid_boxes``, ``{"total", "reasons": {reason: count},
    "images", "files": [the first 5 image files]}`` of the annotations dropped).
    """

    def __init__(self, image_dir, ann_file, transforms=None, with_masks: bool = False,
                 skip_invalid_boxes: bool = False):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transforms, self.with_masks, self.skip_invalid_boxes = transforms, with_masks, skip_invalid_boxes
        self.skipped_boxes: dict = {}
        data = self._read()
        self._check(data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco.createIndex()
        cat_ids = sorted(self.coco.cats)
        self.contiguous_to_cat_id = {i + 1: cat_id for i, cat_id in enumerate(cat_ids)}
        self.cat_id_to_contiguous = {cat_id: i for i, cat_id in self.contiguous_to_cat_id.items()}
        self.num_classes = len(cat_ids) + 1
        self.ids = sorted(self.coco.imgs)
        self.aspect_ratios = [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._load_image(info)
        # Crowd regions are not objects to learn; COCOeval still sees them through self.coco.
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, info["width"])
        boxes[:, 1::2].clamp_(0, info["height"])
        target = {"boxes": boxes,
                  "labels": torch.tensor([self.cat_id_to_contiguous[a["category_id"]] for a in anns],
                                         dtype=torch.int64),
                  "image_id": image_id}
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]  # polygons and RLE alike
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(
                (0, info["height"], info["width"]), dtype=torch.uint8)
        if self.transforms is not None:
            return self.transforms(image, target)
        return F.to_dtype(F.to_image(image), torch.float32, scale=True), target

    def _read(self) -> dict:
        """The COCO instances dict of ``self.ann_file`` (other formats convert theirs to it)."""
        return load_coco_json(self.ann_file)

    def _load_image(self, info: dict) -> Image.Image:
        path, source = self.image_dir / info["file_name"], info.get("source", self.ann_file)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} (image id {info['id']} in {source}) does not exist")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")  # decodes the whole file: truncation shows up here
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot decode image file {path} (image id {info['id']}): {err}") from None
        if image.size != (info["width"], info["height"]):
            raise DataError(f"image file {path} is {image.size[0]}x{image.size[1]} px but {source} "
                            f"says {info['width']}x{info['height']}")
        return image

    # -- checks on the JSON ---------------------------------------------------------------------

    def _check(self, data: dict) -> None:
        images = self._check_images(data["images"])
        cat_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        problems, ann_ids, kept, skipped = [], set(), [], []
        for ann in data["annotations"]:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            where = (ann.get("source") if isinstance(ann, dict) else None) or f"annotation {ann_id}"
            if ann_id is None:
                problems.append(f"annotation without an id: {str(ann)[:80]}")
                continue
            if ann_id in ann_ids:
                problems.append(f"{where}: duplicate annotation id")
            ann_ids.add(ann_id)
            image = images.get(ann.get("image_id"))
            if image is None:
                problems.append(f"{where}: unknown image_id {ann.get('image_id')!r}")
                continue
            where += f" (image {image['file_name']})"
            problem = _annotation_problem(ann, image, cat_ids, self.with_masks)
            if isinstance(problem, tuple) and self.skip_invalid_boxes:  # (reason, message): an invalid box
                skipped.append((problem[0], image["file_name"]))
                continue
            if problem:
                problems.append(f"{where}: {problem[1] if isinstance(problem, tuple) else problem}")
                continue
            # The defaults COCOeval needs (it reads both keys of every ground-truth annotation).
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
            kept.append(ann)
        if skipped:  # out of the training targets and the evaluation ground truth alike
            data["annotations"] = kept
            reasons = {r: n for r in (NOT_FINITE, NOT_POSITIVE, OUTSIDE) if (n := sum(s[0] == r for s in skipped))}
            files = list(dict.fromkeys(f for _, f in skipped))
            self.skipped_boxes = {"total": len(skipped), "reasons": reasons, "images": len(files),
                                  "files": files[:MAX_REPORTED]}
        if problems:
            more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
            raise DataError(f"{self.ann_file}: {len(problems)} invalid annotation(s){more}:\n  "
                            + "\n  ".join(problems[:MAX_REPORTED]))

    def _check_images(self, image_list: list) -> dict:
        images = {}
        for img in image_list:
            if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
                raise DataError(f"{self.ann_file}: image entry {str(img)[:80]} needs id, file_name, width, height")
            if img["id"] in images:
                raise DataError(f"{self.ann_file}: duplicate image id {img['id']} ({img['file_name']})")
            if not (img["width"] > 0 and img["height"] > 0):
                raise DataError(f"{self.ann_file}: image {img['id']} ({img['file_name']}) has size "
                                f"{img['width']}x{img['height']}")
            images[img["id"]] = img
        return images


def skipped_boxes_line(dataset) -> str | None:
    """The one-line report of the boxes ``skip_invalid_boxes`` dropped from ``dataset``, or None."""
    skipped = getattr(dataset, "skipped_boxes", None)
    if not skipped:
        return None
    reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped["reasons"].items())
    more = ", ..." if skipped["images"] > len(skipped["files"]) else ""
    return (f"{dataset.ann_file}: skipped {skipped['total']} invalid box(es) (data.skip_invalid_boxes; {reasons}) "
            f"in {skipped['images']} image(s): {', '.join(skipped['files'])}{more}")


def _annotation_problem(ann: dict, image: dict, cat_ids: set, with_masks: bool) -> str | tuple[str, str] | None:
    """What is wrong with one annotation, or None; an invalid box is ``(reason, message)``."""
    if ann.get("category_id") not in cat_ids:
        return f"category_id {ann.get('category_id')!r} is not in the file's categories {sorted(cat_ids)}"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return f"bbox {box!r} is not [x, y, width, height]"
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        return NOT_FINITE, f"bbox {box} is not finite"
    if w <= 0 or h <= 0:
        return NOT_POSITIVE, f"degenerate box {box}: width and height must be > 0 (zero-area box)"
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        return OUTSIDE, f"box {box} lies outside the {image['width']}x{image['height']} image"
    if with_masks:
        seg = ann.get("segmentation")
        if not seg:
            return "no segmentation, but masks were asked for (with_masks=True)"
        if isinstance(seg, list) and any(len(poly) < 6 or len(poly) % 2 for poly in seg):
            return "a segmentation polygon has fewer than 3 points or an odd number of coordinates"
    return None

"""Open Images box annotations (CSV) to the COCO JSON that :class:`hvdet.data.CocoDetection` reads.

    python -m hvdet.data.openimages --boxes validation-annotations-bbox.csv \\
        --classes class-descriptions-boxable.csv --images validation/ --out instances_validation.json

Inputs are Open Images' own files (V4-V7): the box CSV (``ImageID, Source, LabelName, Confidence,
XMin, XMax, YMin, YMax, IsOccluded, IsTruncated, IsGroupOf, IsDepiction, IsInside``, coordinates in
[0, 1]) and the class descriptions (``LabelName,DisplayName``, with or without a header). Image sizes
come from the image files (their headers only). ``--classes-subset`` keeps the classes listed in a
file of display names, one per line (MLPerf's 264-class subset, for example).

What the COCO form keeps and what it cannot:

* boxes in pixels, one category per Open Images label (ids in the order of the class file);
* ``IsGroupOf`` boxes become ``iscrowd: 1``: pycocotools then lets any number of detections match a
  group box without counting as false positives, as the Open Images challenge metric does (but it
  scores them with COCO's crowd rule, not the challenge's);
* the class hierarchy is lost: a detection of "Rose" does not count for "Flower". The challenge metric
  expands labels up the hierarchy and uses AP at IoU 0.5 with image-level negative labels; hvdet's
  ``target_metric: AP50`` is COCO's AP at IoU 0.5 on this conversion, **not** the challenge's
  mAP. MLPerf's RetinaNet benchmark uses the same kind of conversion and scores it with pycocotools'
  AP@[.5:.95].
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from PIL import Image

from hvdet.atomic import atomic_write
from hvdet.data.coco import DataError

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")


def read_classes(path: str | Path, subset: set[str] | None = None) -> dict[str, tuple[int, str]]:
    """LabelName -> (category id from 1, display name), in the file's order (a subset keeps its order)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) < 2 or row[0] == "LabelName":
                continue
            if subset is None or row[1] in subset:
                out[row[0]] = (len(out) + 1, row[1])
    if not out:
        raise DataError(f"{path}: no classes{' of the subset' if subset else ''}")
    return out


def convert(boxes_csv: str | Path, classes: dict[str, tuple[int, str]], image_dir: str | Path,
            suffix: str = ".jpg") -> dict:
    """The COCO instances dict of every image that has a box of one of ``classes``."""
    image_dir, images, annotations = Path(image_dir), {}, []
    with open(boxes_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{boxes_csv}: not an Open Images box file, missing column(s) {missing}")
        for line, row in enumerate(reader, 2):
            if row["LabelName"] not in classes:
                continue
            image_id = row["ImageID"]
            if image_id not in images:
                images[image_id] = _image(image_dir / f"{image_id}{suffix}", len(images) + 1)
            info = images[image_id]
            try:
                x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
            except ValueError:
                raise DataError(f"{boxes_csv}, line {line}: coordinates are not numbers: {row}") from None
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise DataError(f"{boxes_csv}, line {line}: box {x0, x1, y0, y1} is not inside [0, 1] with "
                                "XMin < XMax and YMin < YMax")
            w, h = info["width"], info["height"]
            box = [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]
            annotations.append({"id": len(annotations) + 1, "image_id": info["id"],
                                "category_id": classes[row["LabelName"]][0], "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(row["IsGroupOf"] == "1")})
    categories = [{"id": cid, "name": name, "supercategory": label} for label, (cid, name) in classes.items()]
    return {"images": list(images.values()), "annotations": annotations, "categories": categories}


def _image(path: Path, image_id: int) -> dict:
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except FileNotFoundError:
        raise DataError(f"image {path} of the box file does not exist") from None
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return {"id": image_id, "file_name": path.name, "width": width, "height": height}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvdet.data.openimages", description=__doc__.split("\n")[0])
    p.add_argument("--boxes", required=True, help="Open Images box CSV, e.g. validation-annotations-bbox.csv")
    p.add_argument("--classes", required=True, help="class descriptions CSV (LabelName,DisplayName)")
    p.add_argument("--images", required=True, help="the folder of <ImageID>.jpg files")
    p.add_argument("--out", required=True, help="the COCO JSON to write")
    p.add_argument("--classes-subset", help="a file of display names to keep, one per line")
    args = p.parse_args(argv)
    subset = None
    if args.classes_subset:
        subset = {line.strip() for line in Path(args.classes_subset).read_text().splitlines() if line.strip()}
    try:
        data = convert(args.boxes, read_classes(args.classes, subset), args.images)
    except DataError as err:
        print(f"hvdet: {err}", file=sys.stderr)
        return 1
    atomic_write(args.out, lambda f: json.dump(data, f))
    print(f"{len(data['images'])} images, {len(data['annotations'])} boxes, {len(data['categories'])} classes "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

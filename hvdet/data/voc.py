"""Pascal VOC detection data (``data.format: voc``): XML annotations read into the COCO form.

The VOC layout and how a recipe's keys map onto it::

    VOCdevkit/VOC2007/                 data.root
        JPEGImages/000005.jpg          data.train_images / val_images: the image folder
        Annotations/000005.xml         read from the image folder's sibling ``Annotations/``
        ImageSets/Main/trainval.txt    data.train_ann / val_ann: the split file, one image id a line

    ds = VOCDetection("VOC2007/JPEGImages", "VOC2007/ImageSets/Main/test.txt",
                      transforms=build_transforms(train=False))

The XML files are converted once, when the dataset is made, to the COCO dict that
:class:`hvdet.data.CocoDetection` reads: this class is a ``CocoDetection`` whose ``coco`` is built in
memory, so the COCO-style evaluator (:mod:`hvdet.eval.coco`) scores it unchanged, and the checks,
the image reading and ``skip_invalid_boxes`` are COCO's. Decisions:

* image ids are 1..N in the split file's order; the file name is the XML's ``<filename>`` (else
  ``<id>.jpg``), width and height its ``<size>`` (no image is decoded to build the dataset);
* classes: the 20 VOC classes in their usual order (labels 1..20, category ids the same), for
  every split alike, so train and val can never disagree; another VOC-format dataset lists its own
  with ``data.format_args: {classes: [...]}``. An object of another class is an error;
* boxes: VOC's are 1-based inclusive pixel indices; as detectron2 does, ``(xmin - 1, ymin - 1,
  xmax, ymax)`` is the 0-based xyxy box (a box over the whole image is ``(0, 0, W, H)``);
* ``difficult`` objects are left out of training and are ignore regions in evaluation: they become
  COCO ``iscrowd: 1`` annotations, which training skips and COCOeval ignores (as py-faster-rcnn's
  VOC training and VOC's own metric do; detectron2 trains on them). The metric stays COCO's AP,
  not VOC's 11-point AP50;
* an XML without any ``<object>`` is an error naming it (VOC's own files always have one; an empty
  file usually means a broken export), unless ``data.format_args: {allow_empty: true}`` keeps such
  images as negatives;
* VOC detection annotations have no masks: a Mask R-CNN recipe is refused when the dataset is made.

Errors are one line naming the file: a missing split file, XML file or ``Annotations/`` folder
(``FileNotFoundError``), malformed XML (with line and column), a missing or non-numeric
``<size>`` / ``<bndbox>`` field, an unknown class, an id listed twice. The XML files are trusted
local input (``xml.etree``; defusedxml is not a dependency).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from hvdet.data.coco import CocoDetection, DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


class VOCDetection(CocoDetection):
    """A Pascal VOC split (see the module docstring); ``ann_file`` is the split file
    (``ImageSets/Main/<split>.txt``), the XML files are in ``<image_dir>/../Annotations``.
    ``ids`` are 1..N in split order; ``voc_ids`` the split file's names of the same images."""

    def __init__(self, image_dir, ann_file, transforms=None, with_masks: bool = False,
                 skip_invalid_boxes: bool = False, classes: Sequence[str] | None = None, allow_empty: bool = False):
        if with_masks:
            raise DataError(f"{ann_file}: VOC detection annotations have boxes only; a mask model needs masks "
                            "(choose a Faster R-CNN or RetinaNet model.arch)")
        self.classes = tuple(classes) if classes is not None else VOC_CLASSES
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise DataError(f"{ann_file}: classes {list(self.classes)} must be distinct names, at least one")
        self.allow_empty = allow_empty
        self.annotation_dir = Path(image_dir).parent / "Annotations"
        super().__init__(image_dir, ann_file, transforms, with_masks, skip_invalid_boxes)

    def _read(self) -> dict:
        self.voc_ids = _split_ids(self.ann_file)
        if not self.annotation_dir.is_dir():
            raise FileNotFoundError(f"{self.annotation_dir} does not exist: VOC's Annotations/ folder must be "
                                    f"beside the image folder {self.image_dir}")
        label = {name: i + 1 for i, name in enumerate(self.classes)}
        images, annotations = [], []
        for image_id, voc_id in enumerate(self.voc_ids, start=1):
            image, objects = self._read_xml(self.annotation_dir / f"{voc_id}.xml", voc_id, image_id)
            images.append(image)
            for k, (name, box, difficult) in enumerate(objects):
                if name not in label:
                    raise DataError(f"{image['source']}: object {k} is a {name!r}, not one of the classes "
                                    f"{', '.join(self.classes)}")
                x0, y0, x1, y1 = box
                bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]  # 1-based inclusive -> 0-based xywh
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label[name],
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(difficult),
                                    "source": f"{image['source']} object {k} (bndbox {x0:g} {y0:g} {x1:g} {y1:g})"})
        categories = [{"id": i + 1, "name": name, "supercategory": "voc"} for i, name in enumerate(self.classes)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _read_xml(self, path: Path, voc_id: str, image_id: int) -> tuple[dict, list]:
        """The COCO image entry of one XML file and its objects ``(name, (xmin, ymin, xmax, ymax), difficult)``."""
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} (listed in {self.ann_file}) does not exist")
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as err:
            line, column = err.position
            raise DataError(f"{path}: invalid XML at line {line} column {column}: {err.msg}") from None
        image = {"id": image_id, "file_name": (root.findtext("filename") or f"{voc_id}.jpg").strip(),
                 "width": _number(root, "size/width", path, int), "height": _number(root, "size/height", path, int),
                 "source": str(path)}
        objects = []
        for k, obj in enumerate(root.findall("object")):
            name = (obj.findtext("name") or "").strip()
            box = tuple(_number(obj, f"bndbox/{c}", path, float, f"object {k} ")
                        for c in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((name, box, _number(obj, "difficult", path, int, f"object {k} ", default=0) == 1))
        if not objects and not self.allow_empty:
            raise DataError(f"{path}: no <object> in this annotation (an image without objects); keep such images "
                            "as negatives with data.format_args: {allow_empty: true}")
        return image, objects


def _split_ids(split_file: Path) -> list[str]:
    """The image ids of a VOC split file (first word of each non-blank line)."""
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist (VOC: ImageSets/Main/<split>.txt)")
    ids, seen = [], {}
    for number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        voc_id = line.split()[0]
        if voc_id in seen:
            raise DataError(f"{split_file}: image {voc_id} is listed twice (lines {seen[voc_id]} and {number})")
        seen[voc_id] = number
        ids.append(voc_id)
    if not ids:
        raise DataError(f"{split_file}: lists no images")
    return ids


def _number(node, tag: str, path: Path, kind, what: str = "", default=None):
    """The number in ``node``'s ``tag``; missing or malformed is an error naming the file and tag."""
    text = node.findtext(tag)
    if text is None and default is not None:
        return default
    try:
        return kind(float(text)) if kind is int else kind(text)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what}<{tag}> is {'missing' if text is None else repr(text)}, "
                        "not a number") from None

"""LVIS v1 (``data.format: lvis``): COCO-like JSON with LVIS's own fields, read through the COCO path.

    ds = LVISDetection("data/coco", "data/coco/annotations/lvis_v1_val.json", transforms=build_transforms(train=False))

What differs from COCO, and what is done about it:

* images have no ``file_name``, only ``coco_url``: the file name is the URL's last two parts,
  ``train2017/000000391895.jpg``, under the image folder, which is therefore the COCO image root
  holding ``train2017/`` and ``val2017/`` (LVIS v1 val draws images from both; detectron2 does the
  same). An entry that has a ``file_name`` keeps it;
* images carry ``neg_category_ids`` and ``not_exhaustive_category_ids``, categories ``frequency``
  (r, c or f) and ``synonyms``: they are checked (lists of known category ids; one of r/c/f; a list
  of strings) and kept in ``coco.dataset``, but neither training nor scoring uses them;
* annotations have no ``iscrowd``: it reads as 0, as in the COCO path.

Everything else (the box and annotation checks, ``skip_invalid_boxes``, images, masks) is
:class:`hvdet.data.CocoDetection`'s. A missing or malformed LVIS field is a one-line ``DataError``
naming the file, the entry and the field (with how many entries have a problem).

Scoring stays pycocotools' COCO AP: it knows nothing of LVIS's federated annotation (a detection of
a class not verified in an image counts as a false positive there, where LVIS ignores it) and
keeps 100 detections per image (LVIS: 300). Official LVIS AP (and APr/APc/APf) needs the lvis-api,
which hvdet does not use: figures from the two are not comparable.
"""
from __future__ import annotations

from hvdet.data.coco import CocoDetection, DataError, load_coco_json

FREQUENCIES = ("r", "c", "f")  # rare (1-10 training images), common (11-100), frequent (> 100)


class LVISDetection(CocoDetection):
    """An LVIS v1 annotation file (see the module docstring); ``image_dir`` is the COCO image root."""

    def _read(self) -> dict:
        data = load_coco_json(self.ann_file)
        problems = []
        cat_ids = set()
        for cat in data["categories"]:
            if not isinstance(cat, dict):
                problems.append(f"category entry {str(cat)[:60]} is not an object")
                continue
            cat_ids.add(cat.get("id"))
            if cat.get("frequency") not in FREQUENCIES:
                problems.append(f"category {cat.get('id')}: field 'frequency' is {cat.get('frequency')!r}, "
                                f"not one of {', '.join(FREQUENCIES)}")
            if not _strings(cat.get("synonyms")):
                problems.append(f"category {cat.get('id')}: field 'synonyms' is {cat.get('synonyms')!r}, "
                                "not a list of strings")
        for image in data["images"]:
            if not isinstance(image, dict):
                continue  # CocoDetection's image check names it
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                value = image.get(key)
                if not isinstance(value, list) or not all(isinstance(v, int) and v in cat_ids for v in value):
                    what = "missing" if value is None else f"{str(value)[:60]}, not a list of the file's category ids"
                    problems.append(f"image {image.get('id')}: field {key!r} is {what}")
            if "file_name" not in image:
                url = image.get("coco_url")
                if not isinstance(url, str) or url.count("/") < 1:
                    problems.append(f"image {image.get('id')}: no 'file_name' and field 'coco_url' is {url!r}, "
                                    "not a URL ending in <folder>/<file>")
                    continue
                image["file_name"] = "/".join(url.rsplit("/", 2)[-2:])  # train2017/000000391895.jpg
        if problems:
            more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
            raise DataError(f"{self.ann_file}: not an LVIS v1 file: {problems[0]}{more}")
        return data


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)

"""Pascal VOC and LVIS datasets, data.skip_invalid_boxes, large-scale jitter: fixtures built in tmp_path."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hvdet.config import ConfigError, from_dict
from hvdet.data import (
    VOC_CLASSES,
    CocoDetection,
    DataError,
    LVISDetection,
    VOCDetection,
    build_transforms,
    skipped_boxes_line,
)
from hvdet.eval.coco import evaluate

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _image(path: Path, width: int, height: int, seed: int) -> None:
    """Noise, so that every image's pixels differ (the stand-in detector finds an image by them)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


def _xml(filename: str, width: int, height: int, objects) -> str:
    """A VOC annotation; ``objects``: (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
             + f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


# id: (file name, width, height, objects); 1-based inclusive boxes as VOC writes them
VOC_IMAGES = {
    "000001": ("000001.png", 48, 32, [("dog", (1, 1, 20, 15), False), ("person", (25, 10, 40, 30), True)]),
    "000002": ("000002.png", 40, 40, [("cat", (5, 6, 30, 28), False), ("car", (2, 30, 39, 40), False)]),
    "000003": ("000003.jpg", 36, 30, [("bird", (10, 4, 33, 27), False)]),
}


def _voc(root: Path, images=VOC_IMAGES, split="train") -> tuple[Path, Path]:
    """A VOC2007-layout tree under ``root``: (image folder, split file)."""
    for seed, (voc_id, (filename, width, height, objects)) in enumerate(images.items()):
        _image(root / "JPEGImages" / filename, width, height, seed)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{voc_id}.xml").write_text(_xml(filename, width, height, objects))
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{voc_id}\n" for voc_id in images))
    return root / "JPEGImages", split_file


def _label(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def test_voc_reads_boxes_0_based_labels_and_difficult_as_ignore(tmp_path):
    ds = VOCDetection(*_voc(tmp_path))
    assert len(ds) == 3 and ds.ids == [1, 2, 3] and ds.voc_ids == ["000001", "000002", "000003"]
    assert ds.num_classes == 21 and ds.contiguous_to_cat_id == {i: i for i in range(1, 21)}
    assert ds.aspect_ratios == [48 / 32, 1.0, 36 / 30]
    image, target = ds[0]
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    # (xmin - 1, ymin - 1, xmax, ymax); the difficult person is not a training target
    assert target["boxes"].tolist() == [[0.0, 0.0, 20.0, 15.0]] and target["labels"].tolist() == [_label("dog")]
    assert ds[1][1]["boxes"].tolist() == [[4.0, 5.0, 30.0, 28.0], [1.0, 29.0, 39.0, 40.0]]
    assert ds[1][1]["labels"].tolist() == [_label("cat"), _label("car")]
    assert ds[2][0].shape == (3, 30, 36)  # the JPEG
    # ...but it is in the ground truth, as an ignore region
    gt = ds.coco.imgToAnns[1]
    assert [(a["category_id"], a["bbox"], a["iscrowd"]) for a in gt] == [
        (_label("dog"), [0, 0, 20, 15], 0), (_label("person"), [24, 9, 16, 21], 1)]
    assert ds.coco.imgs[3]["file_name"] == "000003.jpg" and ds.coco.imgs[3]["width"] == 36


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class GroundTruthDetector(torch.nn.Module):
    """A stand-in detector: returns each image's training targets (found by its pixels) with score 1,
    plus, where given, extra detections (e.g. on a difficult object)."""

    def __init__(self, dataset, extra=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # evaluate() takes the device from a parameter
        self.truth = {}
        for index in range(len(dataset)):
            image, target = dataset[index]
            boxes, labels = target["boxes"], target["labels"]
            if extra and target["image_id"] in extra:
                more_boxes, more_labels = extra[target["image_id"]]
                boxes, labels = torch.cat([boxes, more_boxes]), torch.cat([labels, more_labels])
            self.truth[_key(image)] = {"boxes": boxes, "labels": labels, "scores": torch.ones(len(labels))}

    def forward(self, images):
        return [self.truth[_key(image)] for image in images]


def test_voc_scores_ap_one_with_the_existing_evaluator(tmp_path):
    ds = VOCDetection(*_voc(tmp_path), transforms=build_transforms(train=False))
    # A detection on the difficult person (an ignore region) costs nothing.
    difficult = {1: (torch.tensor([[24.0, 9.0, 40.0, 30.0]]), torch.tensor([_label("person")]))}
    metrics = evaluate(GroundTruthDetector(ds, difficult), ds, images_per_gpu=2, progress=False)
    # (1 - 2e-16: with one object of a class, pycocotools' precision is 1 / (1 + machine epsilon))
    assert [metrics["bbox"][k] for k in ("AP", "AP50", "AP75")] == [pytest.approx(1.0, abs=1e-12)] * 3
    # The dog one pixel off (the 1-based box not converted) is no longer perfect: IoU 0.8.
    model = GroundTruthDetector(ds)
    model.truth = {k: {**v, "boxes": v["boxes"] + 1} if v["labels"].tolist() == [_label("dog")] else v
                   for k, v in model.truth.items()}
    assert evaluate(model, ds, progress=False)["bbox"]["AP"] < 0.99


def _one(voc_id="000001", filename="000001.png", width=48, height=32, objects=(("dog", (1, 1, 20, 15), False),)):
    return {voc_id: (filename, width, height, list(objects))}


@pytest.mark.parametrize("images,edit,message", [
    pytest.param(_one(objects=()), None, r"000001.xml: no <object> in this annotation.*allow_empty: true",
                 id="no-objects"),
    pytest.param(_one(objects=[("unicorn", (1, 1, 5, 5), False)]), None,
                 r"000001.xml: object 0 is a 'unicorn', not one of the classes aeroplane, bicycle", id="unknown-class"),
    pytest.param(_one(), lambda root: (root / "Annotations/000001.xml").write_text("<annotation><size>"),
                 r"000001.xml: invalid XML at line 1 column \d+", id="malformed-xml"),
    pytest.param(_one(), lambda root: (root / "Annotations/000001.xml").write_text(
        _xml("000001.png", 48, 32, []).replace("<object>", "").replace("</annotation>",
                                                                       "<object><name>dog</name></object></annotation>")),
        r"000001.xml: object 0 <bndbox/xmin> is missing, not a number", id="no-bndbox"),
    pytest.param(_one(), lambda root: (root / "Annotations/000001.xml").write_text(
        _xml("000001.png", 48, 32, [("dog", (1, 1, 20, 15), False)]).replace("<width>48", "<width>wide")),
        r"000001.xml: <size/width> is 'wide', not a number", id="bad-size"),
    pytest.param(_one(objects=[("dog", (20, 1, 5, 15), False)]), None,
                 r"train.txt: 1 invalid annotation\(s\):\n  .*000001.xml object 0 \(bndbox 20 1 5 15\) "
                 r"\(image 000001.png\): degenerate box", id="degenerate-box"),
    pytest.param(_one(), lambda root: (root / "ImageSets/Main/train.txt").write_text("000001\n000001\n"),
                 r"train.txt: image 000001 is listed twice \(lines 1 and 2\)", id="listed-twice"),
])
def test_voc_bad_inputs_name_the_file(tmp_path, images, edit, message):
    image_dir, split = _voc(tmp_path, images)
    if edit:
        edit(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        VOCDetection(image_dir, split)
    if "degenerate" not in message:
        assert "\n" not in str(err.value)


def test_voc_missing_files_masks_and_empty_images_allowed(tmp_path):
    image_dir, split = _voc(tmp_path, _one(objects=()))
    ds = VOCDetection(image_dir, split, allow_empty=True)  # data.format_args: {allow_empty: true}
    assert ds[0][1]["boxes"].shape == (0, 4) and ds.coco.imgToAnns[1] == []
    with pytest.raises(DataError, match="VOC detection annotations have boxes only"):
        VOCDetection(image_dir, split, with_masks=True)
    split.write_text("000001\n000009\n")
    with pytest.raises(FileNotFoundError, match=r"Annotations/000009.xml \(listed in .*train.txt\) does not exist"):
        VOCDetection(image_dir, split, allow_empty=True)
    with pytest.raises(FileNotFoundError, match=r"split file .*val.txt does not exist"):
        VOCDetection(image_dir, split.with_name("val.txt"))
    # Custom classes: another VOC-format dataset
    image_dir, split = _voc(tmp_path / "custom", _one(objects=[("widget", (1, 1, 5, 5), False)]))
    ds = VOCDetection(image_dir, split, classes=["gadget", "widget"])
    assert ds.num_classes == 3 and ds[0][1]["labels"].tolist() == [2]
    assert ds.coco.cats[2]["name"] == "widget"


# --------------------------------------------------------------------------------------------
# LVIS
# --------------------------------------------------------------------------------------------


def _lvis(root: Path) -> Path:
    """Two LVIS v1 images in COCO's train2017/ and val2017/ folders, as LVIS v1 val has."""
    _image(root / "train2017" / "000000000007.png", 40, 30, 7)
    _image(root / "val2017" / "000000000009.png", 32, 32, 9)
    data = {
        "info": {}, "licenses": [],
        "images": [
            {"id": 7, "width": 40, "height": 30, "coco_url": "http://images.cocodataset.org/train2017/000000000007.png",
             "neg_category_ids": [3], "not_exhaustive_category_ids": []},
            {"id": 9, "width": 32, "height": 32, "coco_url": "http://images.cocodataset.org/val2017/000000000009.png",
             "neg_category_ids": [], "not_exhaustive_category_ids": [1]},
        ],
        "categories": [
            {"id": 1, "name": "aerosol_can", "frequency": "c", "synonyms": ["aerosol_can", "spray_can"]},
            {"id": 3, "name": "alarm_clock", "frequency": "f", "synonyms": ["alarm_clock"]},
            {"id": 2, "name": "air_conditioner", "frequency": "r", "synonyms": []},
        ],
        "annotations": [  # LVIS has no iscrowd
            {"id": 1, "image_id": 7, "category_id": 2, "bbox": [2.0, 3.0, 10.0, 12.0], "area": 120.0,
             "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]]},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [0.0, 0.0, 32.0, 16.0], "area": 512.0,
             "segmentation": [[0, 0, 32, 0, 32, 16, 0, 16]]},
        ],
    }
    path = root / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    return path


def test_lvis_loads_with_file_names_from_coco_url(tmp_path):
    ds = LVISDetection(tmp_path, _lvis(tmp_path), with_masks=True)
    assert ds.ids == [7, 9] and ds.num_classes == 4 and ds.contiguous_to_cat_id == {1: 1, 2: 2, 3: 3}
    assert [ds.coco.imgs[i]["file_name"] for i in ds.ids] == ["train2017/000000000007.png", "val2017/000000000009.png"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 15.0]] and target["labels"].tolist() == [2]
    assert target["masks"].shape == (1, 30, 40) and int(target["masks"].sum()) == 120
    assert ds[1][1]["labels"].tolist() == [3]
    assert all(a["iscrowd"] == 0 for a in ds.coco.anns.values())  # filled in, as COCOeval needs it
    assert ds.coco.imgs[7]["neg_category_ids"] == [3]  # kept, unused


@pytest.mark.parametrize("edit,message", [
    pytest.param(lambda d: d["images"][1].pop("neg_category_ids"), r"image 9: field 'neg_category_ids' is missing",
                 id="no-neg_category_ids"),
    pytest.param(lambda d: d["images"][0].update(not_exhaustive_category_ids=[99]),
                 r"image 7: field 'not_exhaustive_category_ids' is \[99\], not a list of the file's category ids",
                 id="unknown-category"),
    pytest.param(lambda d: d["images"][0].pop("coco_url"), r"image 7: no 'file_name' and field 'coco_url' is None",
                 id="no-coco_url"),
    pytest.param(lambda d: d["categories"][2].update(frequency="x"),
                 r"category 2: field 'frequency' is 'x', not one of r, c, f", id="bad-frequency"),
    pytest.param(lambda d: [c.pop("synonyms") for c in d["categories"]],
                 r"category 1: field 'synonyms' is None, not a list of strings \(3 problems in all\)",
                 id="no-synonyms"),
])
def test_lvis_malformed_field_is_one_line_naming_file_and_field(tmp_path, edit, message):
    path = _lvis(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"lvis_v1_val.json: not an LVIS v1 file: " + message) as err:
        LVISDetection(tmp_path, path)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# data.skip_invalid_boxes
# --------------------------------------------------------------------------------------------


def _coco_with_bad_boxes(root: Path) -> tuple[Path, Path]:
    for i in (1, 2):
        _image(root / "images" / f"{i}.png", 40, 30, i)
    boxes = {1: [2, 2, 10, 10], 2: [5, 5, 0, 4], 3: [50, 5, 4, 4], 4: [float("nan"), 1, 2, 2], 5: [1, 1, 3, -1],
             6: [3, 3, 8, 8]}
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2)],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": k, "image_id": 1 if k < 5 else 2, "category_id": 1, "bbox": b, "iscrowd": 0,
                             "area": 1.0} for k, b in boxes.items()]}
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))  # NaN is written as the bare NaN that Python's json reads back
    return root / "images", ann


def test_skip_invalid_boxes_drops_counts_and_reports_else_errors(tmp_path):
    images, ann = _coco_with_bad_boxes(tmp_path)
    with pytest.raises(DataError, match=r"4 invalid annotation\(s\):\n  annotation 2 \(image 1.png\): degenerate box"):
        CocoDetection(images, ann)
    ds = CocoDetection(images, ann, skip_invalid_boxes=True)
    assert ds.skipped_boxes == {"total": 4, "reasons": {"not finite": 1, "zero or negative size": 2,
                                                        "outside the image": 1},
                                "images": 2, "files": ["1.png", "2.png"]}
    assert sorted(ds.coco.anns) == [1, 6]  # gone from the evaluation ground truth too
    assert (ds[0][1]["boxes"].tolist() == [[2.0, 2.0, 12.0, 12.0]]
            and ds[1][1]["boxes"].tolist() == [[3.0, 3.0, 11.0, 11.0]])
    line = skipped_boxes_line(ds)
    assert "\n" not in line and line == (f"{ann}: skipped 4 invalid box(es) (data.skip_invalid_boxes; not finite: 1, "
                                         "zero or negative size: 2, outside the image: 1) in 2 image(s): 1.png, 2.png")
    assert skipped_boxes_line(VOCDetection(*_voc(tmp_path / "voc"))) is None  # nothing dropped: no line


def test_skip_invalid_boxes_applies_to_voc_and_reaches_the_run_log(tmp_path, capsys):
    from hvdet.builders import build_dataset, report_skipped_boxes
    from hvdet.runlog import RunLogger, read_jsonl

    images = {**VOC_IMAGES,
              "000004": ("000004.png", 20, 20, [("dog", (9, 1, 3, 5), False), ("cat", (1, 1, 4, 4), False)])}
    _voc(tmp_path / "VOC", images, split="trainval")
    recipe = {"data": {"format": "voc", "root": str(tmp_path / "VOC"), "train_images": "JPEGImages",
                       "train_ann": "ImageSets/Main/trainval.txt", "val_images": "JPEGImages",
                       "val_ann": "ImageSets/Main/trainval.txt"},
              "model": {"arch": "fasterrcnn_resnet18_fpn_fast"}, "solver": {"max_iters": 1}}
    with pytest.raises(DataError, match=r"000004.xml object 0 \(bndbox 9 1 3 5\) \(image 000004.png\): degenerate"):
        build_dataset(from_dict(recipe), train=True)
    recipe["data"]["skip_invalid_boxes"] = True
    train = build_dataset(from_dict(recipe), train=True)
    assert train.skipped_boxes["total"] == 1 and train[3][1]["labels"].tolist() == [_label("cat")]
    logger = RunLogger(tmp_path / "run", tensorboard=False)
    report_skipped_boxes(logger, {"train": train})
    logger.close()
    assert capsys.readouterr().out == f"hvdet: train set: {skipped_boxes_line(train)}\n"
    [record] = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["type"] == "skipped_boxes" and record["split"] == "train" and record["files"] == ["000004.png"]
    recipe["data"]["format_args"] = {"allow_empty": True, "colour": "red"}
    with pytest.raises(ConfigError, match=r"data.format_args \['colour'\]: not options of data.format voc "
                                          r"\(VOCDetection takes \['allow_empty', 'classes'\]\)"):
        build_dataset(from_dict(recipe), train=True)


# --------------------------------------------------------------------------------------------
# Large-scale jitter
# --------------------------------------------------------------------------------------------


def _lsj_sample():
    """An 80x50 image with four boxes (one tiny, near a corner) and their rectangle masks."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 50, 80), dtype=np.uint8))
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [40.0, 10.0, 78.0, 48.0], [10.0, 25.0, 60.0, 45.0],
                          [76.0, 46.0, 79.0, 49.0]])
    masks = torch.zeros(4, 50, 80, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 4]), "masks": masks, "image_id": 5}


def _lsj(seed: int, **kwargs):
    torch.manual_seed(seed)  # the train loader seeds torch's RNG per sample the same way
    tf = build_transforms(train=True, max_size=64, augmentation="lsj", **kwargs)
    return tf(*_lsj_sample())


def test_lsj_fixed_size_boxes_inside_masks_follow_seeded():
    counts = set()
    for seed in range(12):
        image, target = _lsj(seed)
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and target["image_id"] == 5
        boxes, masks = target["boxes"], target["masks"]
        assert type(boxes) is torch.Tensor and len(boxes) == len(target["labels"]) == len(masks)
        assert masks.shape[1:] == (64, 64)
        assert bool((boxes >= 0).all() and (boxes <= 64).all())
        assert bool(((boxes[:, 2:] - boxes[:, :2]) >= 1).all())  # nothing degenerate reaches the model
        for box, mask in zip(boxes, masks, strict=True):  # each mask stays inside its own box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):
                assert (xs.min() >= box[0] - 1 and xs.max() < box[2] + 1
                        and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1)
        counts.add(len(boxes))
        first, again = _lsj(seed), _lsj(seed)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert len(counts) > 1  # at some scales and crops boxes fall out (with their labels and masks)
    assert not torch.equal(_lsj(0)[0], _lsj(1)[0])


def test_lsj_pads_with_the_mean_pixel_and_config_checks():
    image, target = _lsj(0, lsj_scale=(0.5, 0.5), flip_prob=0.0)  # 80x50 -> fits 32x32: 32x20
    pixels = (image * 255).round().to(torch.uint8)
    mean = torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1)  # ImageNet's mean, as uint8
    assert torch.equal(pixels[:, 20:, :].reshape(3, -1), mean.expand(3, 44 * 64))  # bottom
    assert torch.equal(pixels[:, :, 32:].reshape(3, -1), mean.expand(3, 64 * 32))  # right
    assert not torch.equal(pixels[:, 19, :32], mean.expand(3, 32))  # the image itself
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.0, 0.0, 12.0, 8.0]))  # x 0.4, no crop
    with pytest.raises(ValueError, match="augmentation must be one of standard, lsj"):
        build_transforms(train=True, augmentation="mosaic")
    base = {"solver": {"max_iters": 1}}
    cfg = from_dict({**base, "data": {"augmentation": "lsj", "lsj_scale": [0.1, 2], "min_sizes": [1024],
                                      "max_size": 1024}})
    assert cfg.data.lsj_scale == [0.1, 2.0]
    with pytest.raises(ConfigError, match=r"data.augmentation=lsj trains at data.max_size.*give one"):
        from_dict({**base, "data": {"augmentation": "lsj", "min_sizes": [640, 800]}})
    with pytest.raises(ConfigError, match=r"data.lsj_scale is \[low, high\] with 0 < low <= high, got \[2.0, 0.1\]"):
        from_dict({**base, "data": {"lsj_scale": [2.0, 0.1]}})
    with pytest.raises(ConfigError, match=r"data.augmentation must be one of standard, lsj, got 'LSJ'"):
        from_dict({**base, "data": {"augmentation": "LSJ"}})

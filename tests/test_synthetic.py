"""The synthetic shapes dataset: determinism, the objects it draws, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hvdet.data import synthetic
from hvdet.data.synthetic import draw_image, make_synthetic_coco
from tests.harness import ROOT, rank_env


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = _files_of(tmp_path / "a", seed=3)
    b = _files_of(tmp_path / "b", seed=3)
    c = _files_of(tmp_path / "c", seed=4)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)  # every image and both JSON files change


def _files_of(out, seed):
    make_synthetic_coco(out, num_train=4, num_val=2, image_size=64, seed=seed)
    return _files(out)


def test_objects_are_separate_tight_and_of_the_promised_sizes():
    size, counts, categories = 128, [], set()
    for index in range(40):
        pixels, objects = draw_image(np.random.default_rng([0, 0, index]), size)
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        assert 1 <= len(objects) <= 4
        counts.append(len(objects))
        union = np.zeros((size, size), np.int32)
        for obj in objects:
            mask = obj["mask"]
            union += mask
            ys, xs = np.nonzero(mask)
            # bbox is the tight box of the mask's pixels, in COCO's [x, y, w, h] pixel convention
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert obj["area"] == mask.sum()
            side = max(obj["bbox"][2:])
            lo, hi = synthetic.OBJECT_SIDE_FRACTION
            assert lo * size - 2 <= side <= hi * size + 2
            # the JSON polygon reproduces the painted mask exactly
            rle = mask_utils.merge(mask_utils.frPyObjects([obj["polygon"]], size, size))
            assert np.array_equal(mask_utils.decode(rle), mask)
            categories.add(obj["category_id"])
        assert union.max() <= 1  # no two objects share a pixel
    assert categories == {1, 2, 3}
    assert len(set(counts)) >= 3  # varied object counts


@pytest.mark.slow
def test_cli_writes_boxes_only_without_masks(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hvdet.data.synthetic", str(tmp_path), "--train", "3", "--val", "2",
                          "--size", "64", "--seed", "1", "--no-masks"],
                         cwd=ROOT, env=rank_env(), capture_output=True, text=True, check=True)
    assert "Warning" not in out.stderr
    paths = json.loads(out.stdout)
    train = json.loads(Path(paths["train_ann"]).read_text())
    assert len(train["images"]) == 3 and train["annotations"]
    assert all("segmentation" not in a and a["iscrowd"] == 0 for a in train["annotations"])
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize("kwargs", [{"num_train": -1}, {"image_size": 8}, {"max_objects": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_coco(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Presets: the default is unchanged, "hard" (hvdet.data.synthetic_hard) is harder and valid COCO
# ---------------------------------------------------------------------------------------------

def _content_digest(root) -> str:
    """SHA-256 over every file's name and content, PNGs by their pixels (so a different zlib build
    that compresses the same pixels otherwise does not count as a change)."""
    import hashlib

    from PIL import Image

    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(np.asarray(Image.open(path)).tobytes() if path.suffix == ".png" else path.read_bytes())
    return h.hexdigest()


# Digests of the default preset's output before presets existed (commit 9a6457f): it must not change.
SHAPES_DIGESTS = [
    ({"num_train": 4, "num_val": 2, "image_size": 64, "seed": 3},
     "da8b5521d6297251b2b4d3ff5f24fc4cb56cd2a09c4f264ff8474302a401ac15"),
    ({"num_train": 3, "num_val": 2, "image_size": 96, "seed": 0, "max_objects": 6, "masks": False},
     "7759d2819c07ba20606e4fa8bb58dac227cbcf37534fcfba65c096ebb3b4b907"),
]


@pytest.mark.parametrize(("kwargs", "digest"), SHAPES_DIGESTS)
def test_default_preset_output_is_unchanged(tmp_path, kwargs, digest):
    make_synthetic_coco(tmp_path / "default", **kwargs)
    make_synthetic_coco(tmp_path / "shapes", preset="shapes", **kwargs)
    assert _content_digest(tmp_path / "default") == digest
    assert _files(tmp_path / "default") == _files(tmp_path / "shapes")


def test_hard_preset_same_seed_gives_identical_bytes(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_synthetic_coco(tmp_path / name, num_train=6, num_val=2, image_size=64, seed=seed, preset="hard")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a")[Path("annotations/instances_train.json")] != \
        _files(tmp_path / "c")[Path("annotations/instances_train.json")]


@pytest.fixture(scope="module")
def hard_set(tmp_path_factory):
    """40 train images of 128 px from the hard preset, read back through pycocotools."""
    from pycocotools.coco import COCO

    out = tmp_path_factory.mktemp("hard")
    paths = make_synthetic_coco(out, num_train=40, num_val=0, image_size=128, seed=0, preset="hard")
    return COCO(paths["train_ann"]), Path(paths["train_images"])


def test_hard_preset_annotations_are_valid_coco_tight_to_their_visible_masks(hard_set):
    coco, images = hard_set
    assert len(coco.getImgIds()) == 40 and len(coco.getCatIds()) == len(synthetic.synthetic_hard.SHAPES)
    union = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.imgs[ann["image_id"]]
        assert (images / image["file_name"]).is_file() and ann["iscrowd"] == 0
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert ann["area"] == mask.sum() > 0 and w > 0 and h > 0  # no zero-area object
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        seen = union.setdefault(ann["image_id"], np.zeros_like(mask, np.int32))
        seen += mask
    assert all(u.max() <= 1 for u in union.values())  # visible parts: no pixel belongs to two objects


def test_hard_preset_is_harder_than_shapes(hard_set):
    coco, _ = hard_set
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({a["category_id"] for a in anns}) >= 8 > len(synthetic.CATEGORIES)
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) >= 8 and max(counts) <= 12
    assert sum(a["area"] < 10 ** 2 for a in anns) >= 10  # small objects: under 10 x 10 px of 128 x 128
    assert max(a["area"] for a in anns) > 40 ** 2  # and large ones

    def overlaps(a, b):
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
        return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah

    overlapping = sum(any(overlaps(a, b) for a in group for b in group if a is not b)
                      for group in (coco.loadAnns(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()))
    assert overlapping >= 5  # images where some boxes overlap
    occluded = sum(synthetic.synthetic_hard.SHAPES[a["category_id"] - 1] in ("disc", "square")
                   and a["area"] < a["bbox"][2] * a["bbox"][3] * 0.6 for a in anns)
    assert occluded >= 1  # a filled disc or square that covers well under its box is partly hidden


def test_hard_preset_from_the_cli_reads_back_with_masks_and_a_bad_preset(tmp_path, capsys):
    synthetic.main([str(tmp_path / "h"), "--preset", "hard", "--train", "2", "--val", "1", "--size", "64"])
    paths = json.loads(capsys.readouterr().out)
    train = json.loads(Path(paths["train_ann"]).read_text())
    assert train["info"]["preset"] == "hard" and len(train["categories"]) == 10
    assert all(isinstance(a["segmentation"], dict) for a in train["annotations"])  # RLE of the visible part
    from hvdet.data import CocoDetection

    image, target = CocoDetection(paths["train_images"], paths["train_ann"], with_masks=True)[0]
    assert image.shape == (3, 64, 64) and len(target["masks"]) == len(target["boxes"]) >= 1
    with pytest.raises(ValueError, match="preset must be one of shapes, hard"):
        make_synthetic_coco(tmp_path / "x", preset="harder")

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

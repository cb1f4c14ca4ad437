"""COCO reading, bad-input errors, transforms, samplers and the resumable train loader."""
import json
import shutil
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from hvdet.data import (
    CocoDetection,
    DataError,
    TrainLoader,
    build_eval_loader,
    build_transforms,
    epoch_permutation,
    eval_shard,
    group_batches,
    make_synthetic_coco,
    shard_indices,
)
from hvdet.data.synthetic import draw_image


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_coco(out, num_train=10, num_val=3, image_size=64, seed=5)


def test_round_trip_matches_what_the_generator_drew(synth):
    ds = CocoDetection(synth["train_images"], synth["train_ann"], with_masks=True)
    assert len(ds) == 10 and ds.num_classes == 4 and ds.contiguous_to_cat_id == {1: 1, 2: 2, 3: 3}
    assert ds.aspect_ratios == [1.0] * 10
    for index in (0, 7):
        pixels, objects = draw_image(np.random.default_rng([5, 0, index]), 64)  # the generator's draw again
        image, target = ds[index]
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        assert target["image_id"] == index + 1
        assert target["labels"].tolist() == [o["category_id"] for o in objects]
        x, y, w, h = torch.tensor([o["bbox"] for o in objects]).unbind(1)
        torch.testing.assert_close(target["boxes"], torch.stack([x, y, x + w, y + h], 1))
        assert target["masks"].dtype == torch.uint8
        assert torch.equal(target["masks"], torch.from_numpy(np.stack([o["mask"] for o in objects])))


def _broken_copy(synth, tmp_path, edit_json=None):
    """A copy of the synthetic train split; ``edit_json(data)`` changes its annotation file."""
    image_dir = tmp_path / "images"
    shutil.copytree(synth["train_images"], image_dir)
    data = json.loads(Path(synth["train_ann"]).read_text())
    if edit_json:
        edit_json(data)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data, indent=1))
    return image_dir, ann_file


def _set(key, value, index=0):
    def edit(data):
        data["annotations"][index][key] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    pytest.param(_set("bbox", [10, 10, 0, 5]),
                 r"annotation 1 \(image 000000.png\): degenerate box \[10, 10, 0, 5\].*zero-area", id="zero-area"),
    pytest.param(_set("bbox", [10, 10, 5, -2], index=2), r"annotation 3 \(image 00000\d.png\): degenerate box",
                 id="negative-height"),
    pytest.param(_set("bbox", [70, 10, 5, 5]), r"annotation 1 \(image 000000.png\): box \[70, 10, 5, 5\] lies outside",
                 id="outside-image"),
    pytest.param(_set("category_id", 9),
                 r"annotation 1 \(image 000000.png\): category_id 9 is not in the file's categories", id="category"),
    pytest.param(_set("image_id", 999), r"annotation 1: unknown image_id 999", id="unknown-image"),
    pytest.param(_set("segmentation", [[1, 2, 3, 4]]),
                 r"annotation 1 \(image 000000.png\): a segmentation polygon has fewer", id="short-polygon"),
    pytest.param(lambda d: d.pop("categories"), r"missing top-level key\(s\) \['categories'\]", id="no-categories"),
    pytest.param(lambda d: d["images"].append(dict(d["images"][0])), r"duplicate image id 1 \(000000.png\)",
                 id="duplicate-image"),
])
def test_bad_annotations_name_the_file_and_annotation(synth, tmp_path, edit, message):
    image_dir, ann_file = _broken_copy(synth, tmp_path, edit)
    with pytest.raises(DataError, match=message) as err:
        CocoDetection(image_dir, ann_file, with_masks=True)
    assert str(ann_file) in str(err.value)


def test_malformed_json_names_file_and_position(tmp_path):
    ann_file = tmp_path / "broken.json"
    ann_file.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DataError, match=rf"{ann_file}: invalid JSON at line 2 column 19"):
        CocoDetection(tmp_path, ann_file)
    with pytest.raises(FileNotFoundError, match="annotation file .*missing.json does not exist"):
        CocoDetection(tmp_path, tmp_path / "missing.json")


def test_missing_corrupt_and_resized_images_name_the_file(synth, tmp_path):
    image_dir, ann_file = _broken_copy(synth, tmp_path)
    (image_dir / "000001.png").unlink()
    (image_dir / "000002.png").write_bytes((image_dir / "000002.png").read_bytes()[:200])  # truncated
    (image_dir / "000003.png").write_bytes(b"not an image")
    from PIL import Image
    Image.new("RGB", (32, 64)).save(image_dir / "000004.png")
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0][0].shape == (3, 64, 64)
    with pytest.raises(FileNotFoundError, match=r"images/000001.png \(image id 2 in .*instances.json\) does not exist"):
        ds[1]
    with pytest.raises(DataError, match=r"cannot decode image file .*images/000002.png"):
        ds[2]
    with pytest.raises(DataError, match=r"cannot decode image file .*images/000003.png"):
        ds[3]
    with pytest.raises(DataError, match=r"images/000004.png is 32x64 px but .* says 64x64"):
        ds[4]


def test_masks_required_only_when_asked(synth, tmp_path):
    image_dir, ann_file = _broken_copy(synth, tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]])
    assert len(CocoDetection(image_dir, ann_file)[0][1]["boxes"]) > 0
    with pytest.raises(DataError, match="annotation 1 .*no segmentation, but masks were asked for"):
        CocoDetection(image_dir, ann_file, with_masks=True)


def test_crowd_skipped_boxes_clipped_defaults_filled(synth, tmp_path):
    def edit(data):
        next(a for a in data["annotations"] if a["image_id"] == 1)["iscrowd"] = 1
        data["annotations"][-1]["bbox"] = [60.0, 50.0, 10.0, 20.0]  # sticks out of the 64x64 image
        del data["annotations"][-1]["area"], data["annotations"][-1]["iscrowd"]
    image_dir, ann_file = _broken_copy(synth, tmp_path, edit)
    ds = CocoDetection(image_dir, ann_file)
    crowd = [a for a in ds.coco.imgToAnns[1] if a["iscrowd"]]
    assert len(crowd) == 1  # still in the ground truth (COCOeval ignores matches to it) ...
    assert len(ds[0][1]["boxes"]) == len(ds.coco.imgToAnns[1]) - 1  # ... but not a training target
    last = ds.coco.dataset["annotations"][-1]
    assert last["iscrowd"] == 0 and last["area"] == 200.0
    boxes = ds[ds.ids.index(last["image_id"])][1]["boxes"]
    assert boxes[-1].tolist() == [60.0, 50.0, 64.0, 64.0]


def test_transforms_flip_and_resize_move_boxes_and_masks_with_the_image():
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    masks = torch.zeros((1, 40, 60), dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    target = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]]), "labels": torch.tensor([2]), "image_id": 7,
              "masks": masks}
    flip = build_transforms(train=True, min_sizes=(40,), max_size=1000, flip_prob=1.0)
    out, t = flip(image, target)
    torch.testing.assert_close(out, image.flip(-1).float() / 255)
    assert t["boxes"].tolist() == [[30.0, 5.0, 50.0, 15.0]] and type(t["boxes"]) is torch.Tensor
    assert torch.equal(t["masks"], masks.flip(-1)) and t["labels"].tolist() == [2] and t["image_id"] == 7
    resize = build_transforms(train=True, min_sizes=(20, 80), max_size=100, flip_prob=0.0)
    shapes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, t = resize(image, target)
        h, w = out.shape[-2:]
        shapes.add((h, w))
        assert t["masks"].shape[-2:] == (h, w)
        torch.testing.assert_close(t["boxes"], target["boxes"] * torch.tensor([w / 60, h / 40] * 2))
    assert shapes == {(20, 30), (66, 100)}  # shorter side 20, or 80 capped by the longer side's 100
    out, t = build_transforms(train=False, min_sizes=(20,))(image, target)  # eval: the model resizes
    assert out.shape == (3, 40, 60) and torch.equal(t["boxes"], target["boxes"])


def test_shards_are_disjoint_cover_the_set_and_follow_seed_and_epoch():
    assert epoch_permutation(50, seed=1, epoch=2) == epoch_permutation(50, seed=1, epoch=2)
    assert epoch_permutation(50, seed=1, epoch=2) != epoch_permutation(50, seed=1, epoch=3)
    shards = [shard_indices(48, r, 4, seed=1, epoch=2) for r in range(4)]
    assert sorted(chain(*shards)) == list(range(48))
    shards = [shard_indices(50, r, 4, seed=1, epoch=2) for r in range(4)]  # padded to 52: equal shards
    assert [len(s) for s in shards] == [13] * 4 and set(chain(*shards)) == set(range(50))
    evals = [eval_shard(50, r, 4) for r in range(4)]
    assert sorted(chain(*evals)) == list(range(50))  # evaluation: no padding, no duplicates


def test_aspect_grouping_keeps_batches_on_one_side_of_one():
    aspects = [0.5, 1.5, 1.0, 0.75, 2.0, 0.6, 1.2, 0.9, 1.1]
    batches = group_batches(list(range(9)), aspects, images_per_gpu=2)
    assert len(batches) == 4 and len({i for b in batches for i in b}) == 8
    for batch in batches[:-1]:
        assert len({aspects[i] >= 1 for i in batch}) == 1
    assert group_batches(list(range(9)), aspects, 2, aspect_grouping=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same_batches(a, b):
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b, strict=True):
        assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
        for x, y in zip(images_a + [t["boxes"] for t in targets_a], images_b + [t["boxes"] for t in targets_b],
                        strict=True):
            assert torch.equal(x, y)


def test_train_loader_resumes_exactly_mid_epoch_and_across_epochs(synth):
    tf = build_transforms(train=True, min_sizes=(48, 64, 80), max_size=100)
    ds = CocoDetection(synth["train_images"], synth["train_ann"], transforms=tf)
    loader = TrainLoader(ds, images_per_gpu=2, rank=1, world_size=2, seed=3, num_workers=0)
    assert loader.batches_per_epoch == 2  # 5 images on this rank
    rng_before = torch.get_rng_state()
    first = _take(loader, 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # per-sample seeding leaves the caller's RNG alone
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 1}
    rest = _take(loader, 3)
    assert loader.epoch == 2
    resumed = TrainLoader(ds, images_per_gpu=2, rank=1, world_size=2, seed=3, num_workers=1)  # a worker process
    resumed.load_state_dict(state)
    _same_batches(_take(resumed, 3), rest)
    fresh = TrainLoader(ds, images_per_gpu=2, rank=1, world_size=2, seed=3, num_workers=0)
    _same_batches(_take(fresh, 3), first)
    other_rank = TrainLoader(ds, images_per_gpu=2, rank=0, world_size=2, seed=3, num_workers=0)
    seen = {t["image_id"] for _, targets in first[:2] + _take(other_rank, 2) for t in targets}
    assert len(seen) == 8  # epoch 0: the two ranks' 2 x 2 batches hold 8 distinct images
    with pytest.raises(ValueError, match="does not fit an epoch of 2 batches"):
        resumed.load_state_dict({"epoch": 0, "position": 5})
    resumed.close()


def test_eval_loader_gives_each_rank_its_shard_once(synth):
    ds = CocoDetection(synth["train_images"], synth["train_ann"])
    ids = [[t["image_id"] for _, targets in build_eval_loader(ds, 2, r, 3, num_workers=0) for t in targets]
           for r in range(3)]
    assert sorted(chain(*ids)) == sorted(ds.ids) and [len(i) for i in ids] == [4, 3, 3]

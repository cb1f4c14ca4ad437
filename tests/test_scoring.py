"""eval.scorer (hvdet.scoring): faster-coco-eval's COCOeval stats == pycocotools', boxes and masks, on
noisy detections with score ties, false positives, duplicates and crowd regions, and on a real (untrained)
model's detections through hvdet's evaluation path; auto falls back to pycocotools; a bad name is one line."""
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hvdet import scoring
from hvdet.config import ConfigError, load_config
from hvdet.data import CocoDetection, build_transforms, make_synthetic_coco
from hvdet.eval.coco import IOU_TYPES, METRICS, coco_eval, detect_shard, evaluate
from hvdet.models import build_detector
from tests.harness import ROOT

# faster-coco-eval rounds some precisions (tp / (tp + fp)) differently in the last bit, so a mean over
# them may differ by a few 1e-17; nothing larger is a rounding difference.
TOLERANCE = 1e-12


def _ground_truth(out_dir, preset: str) -> COCO:
    """The synthetic set (polygons for shapes, RLEs for hard) with crowd regions added: two objects
    turned into crowds, and a crowd region (uncompressed RLE, as COCO writes crowds) in every third image."""
    paths = make_synthetic_coco(out_dir, num_train=0, num_val=18, image_size=96, seed=11, preset=preset)
    data = json.loads(Path(paths["val_ann"]).read_text())
    for ann in data["annotations"][3:5]:
        ann["iscrowd"] = 1
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image in data["images"][::3]:
        region = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        region[50:90, 10:60] = 1
        counts, value, run = [], 0, 0  # column-major run lengths, starting with zeros
        for pixel in region.flatten(order="F"):
            if pixel == value:
                run += 1
            else:
                counts.append(run)
                value, run = pixel, 1
        counts.append(run)
        data["annotations"].append({"id": next_id, "image_id": image["id"], "category_id": 1, "iscrowd": 1,
                                    "bbox": [10.0, 50.0, 50.0, 40.0], "area": 2000.0,
                                    "segmentation": {"counts": counts, "size": [image["height"], image["width"]]}})
        next_id += 1
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(coco: COCO, seed: int = 0) -> list[dict]:
    """Detections derived from the ground truth: jittered boxes, shifted and grown masks, scores rounded
    to 0.1 (ties), missed objects, duplicates, false positives (some on the crowd regions), and one
    image with more than maxDets=100 detections."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco.cats)
    out = []

    def add(image_id, category_id, mask, score):
        rle = mask_utils.encode(np.asfortranarray(mask))
        box = [float(v) for v in mask_utils.toBbox(rle)]
        box = [box[0] + rng.normal(0, 1), box[1] + rng.normal(0, 1), box[2] * rng.uniform(0.9, 1.1),
               box[3] * rng.uniform(0.9, 1.1)]
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"image_id": image_id, "category_id": category_id, "bbox": box, "segmentation": rle,
                    "score": score})

    for ann in coco.anns.values():
        if rng.random() < 0.15:
            continue  # missed
        mask = np.roll(coco.annToMask(ann), int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
        if rng.random() < 0.3:  # grown by a pixel
            mask = np.maximum(mask, np.roll(mask, 1, axis=1))
        wrong_class = rng.random() < 0.1
        category = int(rng.choice(cat_ids)) if wrong_class else ann["category_id"]
        add(ann["image_id"], category, mask, round(0.3 + 0.7 * float(rng.random()), 1))
        if rng.random() < 0.2:  # a duplicate, lower
            add(ann["image_id"], category, mask, round(0.5 * float(rng.random()), 1))
    for info in coco.imgs.values():
        h, w = info["height"], info["width"]
        for _ in range(int(rng.integers(0, 4)) + (120 if info["id"] == 2 else 0)):
            x, y = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y:y + int(rng.integers(4, h - y)), x:x + int(rng.integers(4, w - x))] = 1
            add(info["id"], int(rng.choice(cat_ids)), mask, round(0.6 * float(rng.random()), 1))
    return out


def _stats(coco, detections, iou_type, scorer):
    key = IOU_TYPES[iou_type]
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], key: d[key], "score": d["score"]}
               for d in detections]
    return np.array(scoring.cocoeval_stats(coco, copy.deepcopy(results), iou_type, scorer))


@pytest.fixture(scope="module", params=["shapes", "hard"])
def ground_truth(request, tmp_path_factory):
    return _ground_truth(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_stats_equal_pycocotools(ground_truth, iou_type):
    detections = _detections(ground_truth)
    assert scoring.resolve("auto") == "faster_coco_eval"  # installed (setup.py pins it): nothing is skipped
    reference = _stats(ground_truth, detections, iou_type, "pycocotools")
    assert 0.1 < reference[0] < 0.9 and reference[1] > reference[0]  # a mixed result, not all or nothing
    assert (reference[6:9] > 0).all()
    faster = _stats(ground_truth, detections, iou_type, "faster_coco_eval")
    np.testing.assert_allclose(faster, reference, rtol=0, atol=TOLERANCE)
    # Scored again, from the cached ground truth: the same.
    np.testing.assert_array_equal(_stats(ground_truth, detections, iou_type, "faster_coco_eval"), faster)
    # hvdet's names for the first six, from either scorer.
    metrics = {s: coco_eval(ground_truth, detections, iou_type, s) for s in scoring.SCORERS}
    assert list(metrics["pycocotools"]) == list(metrics["faster_coco_eval"]) == list(METRICS)
    for name in METRICS:
        assert metrics["faster_coco_eval"][name] == pytest.approx(metrics["pycocotools"][name], rel=0, abs=TOLERANCE)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_detections_and_perfect_detections_score_alike(ground_truth, iou_type):
    for scorer in scoring.SCORERS:
        assert coco_eval(ground_truth, [], iou_type, scorer)["AP"] == 0.0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": ground_truth.annToRLE(a)} for a in ground_truth.anns.values() if not a["iscrowd"]]
    stats = {s: _stats(ground_truth, perfect, iou_type, s) for s in scoring.SCORERS}
    np.testing.assert_allclose(stats["faster_coco_eval"], stats["pycocotools"], rtol=0, atol=TOLERANCE)
    assert stats["pycocotools"][0] == 1.0


def test_the_ground_truth_is_left_as_it_was(ground_truth):
    before = copy.deepcopy(ground_truth.dataset)
    _stats(ground_truth, _detections(ground_truth), "segm", "faster_coco_eval")
    assert ground_truth.dataset == before  # faster-coco-eval scores a copy (it adds RLEs to what it scores)


def test_auto_falls_back_to_pycocotools_without_faster_coco_eval(ground_truth, monkeypatch):
    detections = _detections(ground_truth)
    reference = _stats(ground_truth, detections, "bbox", "pycocotools")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # `import faster_coco_eval` raises ImportError
    assert scoring.resolve("auto") == "pycocotools"
    np.testing.assert_array_equal(_stats(ground_truth, detections, "bbox", "auto"), reference)
    with pytest.raises(ImportError) as err:
        scoring.resolve("faster_coco_eval")
    assert len(str(err.value).splitlines()) == 1 and "pip install faster-coco-eval==1.8.0" in str(err.value)
    with pytest.raises(ConfigError) as err:  # found when the recipe is loaded, not at the first evaluation
        load_config(ROOT / "configs/synthetic_demo.yaml", ["eval.scorer=faster_coco_eval"])
    assert len(str(err.value).splitlines()) == 1 and "not installed" in str(err.value)


def test_a_bad_scorer_name_is_one_line(ground_truth):
    with pytest.raises(ValueError) as err:
        coco_eval(ground_truth, [], "bbox", scorer="faster-coco-eval")
    assert str(err.value) == ("eval.scorer must be one of auto, pycocotools, faster_coco_eval, "
                              "got 'faster-coco-eval'")
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/synthetic_demo.yaml", ["eval.scorer=fastercoco"])
    assert str(err.value).splitlines() == [
        ("override 'eval.scorer=fastercoco': eval.scorer must be one of auto, pycocotools, faster_coco_eval, got "
         "'fastercoco'; did you mean 'faster_coco_eval'?")]
    assert load_config(ROOT / "configs/synthetic_demo.yaml").eval.scorer == "auto"


@pytest.mark.parametrize("arch,iou_types", [("fasterrcnn_resnet18_fpn_fast", ("bbox",)),
                                            ("maskrcnn_resnet18_fpn_fast", ("bbox", "segm"))])
@pytest.mark.slow
def test_a_real_models_metrics_are_the_same_with_either_scorer(tmp_path, arch, iou_types):
    """An untrained detector (fixed seed) through hvdet.eval.coco.evaluate, single-process: its scores
    hover around 1 / classes, so it returns 100 boxes per image (a few match; its masks match none at
    IoU 0.5, so segm checks the plumbing: all zeros). Then all 12 stats of the same detections."""
    paths = make_synthetic_coco(tmp_path, num_train=0, num_val=6, image_size=96, seed=4)
    dataset = CocoDetection(paths["val_images"], paths["val_ann"], transforms=build_transforms(train=False),
                            with_masks=True)
    torch.manual_seed(0)
    model = build_detector(arch, dataset.num_classes)
    metrics = {s: evaluate(model, dataset, iou_types=iou_types, progress=False, scorer=s) for s in scoring.SCORERS}
    assert evaluate(model, dataset, iou_types=iou_types, progress=False) == metrics["faster_coco_eval"]  # auto
    for iou_type in iou_types:
        reference, faster = metrics["pycocotools"][iou_type], metrics["faster_coco_eval"][iou_type]
        assert list(reference) == list(faster) == list(METRICS)
        for name in METRICS:
            assert faster[name] == pytest.approx(reference[name], rel=0, abs=TOLERANCE), (iou_type, name)
    assert metrics["pycocotools"]["bbox"]["AP50"] > 0  # some boxes match: a real comparison
    _, detections = detect_shard(model, dataset, 0, 1, with_masks="segm" in iou_types)
    assert len(detections) == 100 * len(dataset)
    for iou_type in iou_types:
        stats = {s: _stats(dataset.coco, detections, iou_type, s) for s in scoring.SCORERS}
        np.testing.assert_allclose(stats["faster_coco_eval"], stats["pycocotools"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("configured,used", [("auto", "faster_coco_eval"), ("pycocotools", "pycocotools")])
def test_each_eval_record_names_its_scorer(tmp_path, configured, used):
    from types import SimpleNamespace

    from hvdet.eval.results import record
    from hvdet.run import Clock
    from hvdet.runlog import RunLogger

    cfg = load_config(ROOT / "configs/synthetic_demo.yaml", [f"eval.scorer={configured}"])
    run = SimpleNamespace(cfg=cfg, clock=Clock(), logger=RunLogger(tmp_path))
    metrics = {"bbox": dict.fromkeys(METRICS, 0.25)}
    record(run, 20, metrics, eval_s=1.0, counts_at_s=5.0, snapshot={"when": {"iteration": 20}, "epoch": 0})
    run.logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["type"] == "eval" and line["scorer"] == used and line["bbox"] == metrics["bbox"]

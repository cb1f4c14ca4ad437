"""COCO evaluation: perfect and empty detections, output conversion, sharded == single-process."""
import hashlib
import json

import pytest
import torch

from hvdet.data import CocoDetection, build_transforms, make_synthetic_coco
from hvdet.eval.coco import coco_eval, evaluate, to_coco_detections
from tests.harness import run_ranks


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    # 7 val images: over 2 ranks the shards are unequal (4 + 3) and the last batch is partial.
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=0, num_val=7, image_size=96, seed=2)


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class JitteredTruth(torch.nn.Module):
    """A stand-in detector: finds the image's ground truth by its pixels and returns it with seeded
    box jitter, scores and one false positive per image, so AP is high but not 1. Outputs depend
    on the image alone, not on batch or rank, like a real model's."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {_key(image): target for image, target in (dataset[i] for i in range(len(dataset)))}
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives evaluate() a device to move images to
        self.modes = []
        self.fail = False

    def forward(self, images):
        if self.fail:
            raise FloatingPointError("stand-in model failure")
        self.modes.append(self.training)
        return [self._detect(self.truth[_key(image)]) for image in images]

    @staticmethod
    def _detect(target):
        g = torch.Generator().manual_seed(int(target["image_id"]))
        n = len(target["boxes"])
        boxes = torch.cat([target["boxes"] + torch.empty(n, 4).uniform_(-2.5, 2.5, generator=g),
                           torch.tensor([[0.0, 0.0, 20.0, 20.0]])])
        shift = int(target["image_id"]) % 3 - 1  # masks off by -1, 0 or +1 px
        masks = torch.cat([target["masks"].float().roll(shift, dims=-1) * 0.9,
                           torch.zeros(1, *target["masks"].shape[1:])])
        masks[-1, :20, :20] = 0.8
        false_label = int(target["image_id"]) % 3 + 1
        return {"boxes": boxes, "labels": torch.cat([target["labels"], torch.tensor([false_label])]),
                "scores": torch.cat([torch.rand(n, generator=g) * 0.5 + 0.5, torch.tensor([0.8])]),
                "masks": masks[:, None]}


def _val(synth):
    return CocoDetection(synth["val_images"], synth["val_ann"], transforms=build_transforms(train=False),
                         with_masks=True)


def case_sharded_evaluate(synth):
    from hvdet import comm
    from hvdet.data import TrainLoader

    dataset = _val(synth)
    model = JitteredTruth(dataset).train()
    # A DataLoader worker process, forked after Horovod started, as in training.
    metrics = evaluate(model, dataset, images_per_gpu=2, num_workers=1, iou_types=("bbox", "segm"), progress=False)
    modes, training_after = list(model.modes), model.training
    # The train loader under the launcher: one epoch of this rank's shard, loaded by a worker.
    loader = TrainLoader(dataset, images_per_gpu=2, rank=comm.rank(), world_size=comm.size(), num_workers=1)
    train_ids = [t["image_id"] for _ in range(loader.batches_per_epoch) for t in next(loader)[1]]
    # A failure on one rank (here: rank 1's model) must reach every rank, not leave rank 0 waiting.
    model.fail = comm.rank() == 1
    try:
        evaluate(model, dataset, progress=False)
        failure = None
    except (RuntimeError, FloatingPointError) as err:
        failure = f"{type(err).__name__}: {err}"
    return {"metrics": metrics, "modes": modes, "training_after": training_after, "train_ids": train_ids,
            "failure": failure}


def _single_process_reference(synth):
    """Detections of the whole val set in one loop, scored by plain coco_eval: the oracle."""
    dataset = _val(synth)
    model = JitteredTruth(dataset)
    detections = []
    for image, target in (dataset[i] for i in range(len(dataset))):
        detections += to_coco_detections(model([image])[0], target["image_id"], dataset.contiguous_to_cat_id, True)
    return {t: coco_eval(dataset.coco, detections, t) for t in ("bbox", "segm")}


def test_sharded_evaluation_equals_single_process(synth):
    expected = _single_process_reference(synth)
    assert 0.3 < expected["bbox"]["AP"] < 0.95 and expected["bbox"]["AP50"] > expected["bbox"]["AP"]
    assert 0.3 < expected["segm"]["AP"] < 0.95
    results = run_ranks("tests.test_evaluation:case_sharded_evaluate", np=2, launcher="horovodrun", synth=synth)
    for rank_result in results:
        assert rank_result["metrics"] == expected  # exactly, on every rank
        assert rank_result["training_after"] is True and set(rank_result["modes"]) == {False}
    assert [len(r["modes"]) for r in results] == [2, 2]  # 4 + 3 images in batches of 2
    assert results[0]["failure"] == "RuntimeError: evaluation failed on another rank; rank 1: FloatingPointError: " \
        "stand-in model failure"
    assert results[1]["failure"] == "FloatingPointError: stand-in model failure"
    train_ids = [r["train_ids"] for r in results]  # 7 images padded to 8: one shows up twice
    assert [len(ids) for ids in train_ids] == [4, 4] and set(train_ids[0] + train_ids[1]) == set(range(1, 8))
    assert evaluate(JitteredTruth(_val(synth)), _val(synth), iou_types=("bbox", "segm"), progress=False) == expected


def test_perfect_detections_give_ap_one_and_none_give_zero(synth):
    coco = _val(synth).coco
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": coco.annToRLE(a)} for a in coco.anns.values()]
    for iou_type in ("bbox", "segm"):
        metrics = coco_eval(coco, perfect, iou_type)
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 1.0
        assert all(metrics[k] in (1.0, -1.0) for k in ("APs", "APm", "APl"))  # -1: no objects of that size
        assert coco_eval(coco, [], iou_type)["AP"] == 0.0


def test_output_conversion_maps_labels_to_category_ids_and_boxes_to_xywh():
    output = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2]),
              "scores": torch.tensor([0.25]), "masks": torch.zeros(1, 1, 8, 8)}
    output["masks"][0, 0, 2:4, 1:6] = 0.7
    output["masks"][0, 0, 5, 5] = 0.4  # below the 0.5 threshold
    (det,) = to_coco_detections(output, 42, {1: 7, 2: 90}, with_masks=True)
    assert det["image_id"] == 42 and det["category_id"] == 90 and det["score"] == 0.25
    assert det["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert det["segmentation"]["size"] == [8, 8] and isinstance(det["segmentation"]["counts"], str)
    from pycocotools import mask as mask_utils
    assert mask_utils.area(det["segmentation"]) == 10
    json.dumps(det)  # results are JSON-ready
    with pytest.raises(ValueError, match="no 'masks'"):
        to_coco_detections({k: v for k, v in output.items() if k != "masks"}, 1, {2: 3}, with_masks=True)


def test_resized_eval_images_and_bad_arguments_are_refused(synth):
    dataset = CocoDetection(synth["val_images"], synth["val_ann"],
                            transforms=build_transforms(train=True, min_sizes=(32,), flip_prob=0.0))
    model = JitteredTruth(_val(synth))
    with pytest.raises(ValueError,
                       match=r"000000.png reached the model at \(32, 32\).*build_transforms\(train=False\)"):
        evaluate(model, dataset, progress=False)
    with pytest.raises(ValueError, match="iou_types must be among"):
        evaluate(model, dataset, iou_types=("keypoints",))
    boxes_only = CocoDetection(synth["val_images"], synth["val_ann"])
    for ann in boxes_only.coco.anns.values():
        del ann["segmentation"]
    with pytest.raises(ValueError, match="boxes only"):
        coco_eval(boxes_only.coco, [], "segm")

"""Fine-tuning from any checkpoint (``model.init_from``, :mod:`hvdet.finetune`): a detector trained on
one label set starts a run on another; the class-dependent heads stay fresh, everything else loads."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hvdet.checkpoint import FORMAT, CheckpointError
from hvdet.config import ConfigError, load_config
from hvdet.finetune import init_from
from hvdet.models import build_detector
from tests.harness import ROOT

ARCH = "fasterrcnn_resnet18_fpn_fast"
CLASS_HEADS = ["roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
               "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"]


def trained_detector(num_classes: int, seed: int = 1, norm: str = "local") -> torch.nn.Module:
    """A detector whose every tensor differs from a fresh one of another seed (BN statistics included)."""
    torch.manual_seed(seed)
    model = build_detector(ARCH, num_classes, norm=norm)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return model


def save_hvdet_checkpoint(model: torch.nn.Module, run_dir, iteration: int = 10):
    """As hvdet.checkpoint.save writes it: the format marker, the model, numpy / torch / Python RNG states."""
    path = run_dir / "checkpoints" / f"iter_{iteration:07d}.pt"
    path.parent.mkdir(parents=True)
    rng = {"numpy": np.random.RandomState(0).get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save({"format": FORMAT, "iteration": iteration, "model": model.state_dict(), "rng": [rng],
                "config": {"model": {"arch": ARCH}}}, path)
    return path


def fresh_copy(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_run_of_3_classes_starts_a_5_class_model_all_but_the_class_heads(tmp_path):
    source = trained_detector(4)  # 3 classes + background
    path = save_hvdet_checkpoint(source, tmp_path / "run")
    torch.manual_seed(2)
    model = build_detector(ARCH, 6)  # 5 classes + background, FrozenBatchNorm2d: no num_batches_tracked
    fresh = fresh_copy(model)
    report = init_from(model, tmp_path / "run")  # a run's output_dir: its newest checkpoint
    assert report.path == str(path)
    src = source.state_dict()
    for name, value in model.state_dict().items():
        if name in CLASS_HEADS:
            assert value.shape != src[name].shape and torch.equal(value, fresh[name]), name
        else:
            assert torch.equal(value, src[name]), name
    assert sorted(report.reinitialized) == sorted(CLASS_HEADS)
    assert report.counts() == {"loaded": len(fresh) - 4, "skipped": 0, "reinitialized": 4, "missing": 0,
                               "unexpected": 0}  # the source's BN step counters are left out of the lists
    assert report.line().startswith(f"model.init_from {path}: {len(fresh) - 4} tensors loaded, 0 skipped")
    assert "roi_heads.box_predictor.cls_score.weight" in report.line() and "\n" not in report.line()
    json.dumps(report.record())  # the metrics.jsonl record is plain JSON


def test_init_skip_patterns_keep_the_matching_tensors_fresh(tmp_path):
    source = trained_detector(4)
    path = save_hvdet_checkpoint(source, tmp_path / "run")
    torch.manual_seed(2)
    model = build_detector(ARCH, 4, norm="local")  # the same classes: without patterns, everything would load
    fresh = fresh_copy(model)
    report = init_from(model, path, skip=["roi_heads.box_predictor.*", "rpn.head.cls_logits.*"])
    skipped = [*CLASS_HEADS, "rpn.head.cls_logits.weight", "rpn.head.cls_logits.bias"]
    assert sorted(report.skipped) == sorted(skipped) and report.reinitialized == []
    assert report.counts()["loaded"] == len(fresh) - 6
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh[name] if name in skipped else source.state_dict()[name]), name
    with pytest.raises(CheckpointError, match=r"model.init_skip pattern 'roi_heads.box_predictr.\*' matches no"):
        init_from(model, path, skip=["roi_heads.box_predictr.*"])


@pytest.mark.slow
def test_a_torchvision_detector_state_dict_and_what_a_file_lacks_or_adds(tmp_path):
    """torchvision's own detector state dict (its names are hvdet's), a Mask R-CNN's for a Faster R-CNN
    (mask head: unexpected), and a Faster R-CNN's for a Mask R-CNN (mask head: missing)."""
    import torchvision

    torch.manual_seed(3)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv.pth"
    torch.save({f"module.{k}": v for k, v in tv.state_dict().items()}, path)  # as a DDP-wrapped model saves it
    model = build_detector("fasterrcnn_resnet50_fpn", 6)  # frozen BN: tv's BatchNorm2d counters are left out
    report = init_from(model, path)
    assert sorted(report.reinitialized) == sorted(CLASS_HEADS) and report.missing == report.unexpected == []
    torch.testing.assert_close(model.roi_heads.box_head.fc7.weight, tv.roi_heads.box_head.fc7.weight)
    torch.testing.assert_close(model.backbone.body.layer4[2].bn3.running_var,
                               tv.backbone.body.layer4[2].bn3.running_var)

    mask_path = tmp_path / "mask.pt"
    torch.save(build_detector("maskrcnn_resnet18_fpn_fast", 4).state_dict(), mask_path)
    report = init_from(build_detector(ARCH, 4), mask_path)
    assert report.unexpected and all(k.startswith("roi_heads.mask_") for k in report.unexpected)
    report = init_from(build_detector("maskrcnn_resnet18_fpn_fast", 6), save_hvdet_checkpoint(trained_detector(4),
                                                                                                  tmp_path / "faster"))
    assert report.missing and all(k.startswith("roi_heads.mask_") for k in report.missing)
    assert sorted(report.reinitialized) == sorted(CLASS_HEADS)


def test_errors_are_one_line_naming_the_file(tmp_path):
    model = build_detector(ARCH, 4)
    resnet = tmp_path / "resnet18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    (tmp_path / "empty_run").mkdir()
    cases = {tmp_path / "nope.pt": "does not exist", tmp_path / "empty_run": "without checkpoints",
             garbage: "cannot be read", a_list: "neither an hvdet checkpoint nor a model state_dict",
             resnet: "none of its 122 tensors fits this model.*use model.pretrained_backbone"}
    for path, cause in cases.items():
        with pytest.raises(CheckpointError, match=cause) as err:
            init_from(model, path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), str(err.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # what unpickling this would do with weights_only=False


def test_reading_a_file_runs_no_code_from_it(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "created_by_the_file"
    torch.save({"format": FORMAT, "model": build_detector(ARCH, 4).state_dict(), "extra": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt cannot be read .*GLOBAL posix.mkdir") as err:
        init_from(build_detector(ARCH, 4), path)
    assert not marker.exists() and "\n" not in str(err.value)


def test_init_skip_needs_init_from():
    with pytest.raises(ConfigError, match="model.init_skip .* only applies with model.init_from"):
        load_config(ROOT / "configs/synthetic_demo.yaml", ["model.init_skip=[roi_heads.box_predictor.*]"])
    cfg = load_config(ROOT / "configs/synthetic_demo.yaml",
                      ["model.init_from=runs/x", "model.init_skip=['roi_heads.box_predictor.*', '*.cls_logits.*']"])
    assert cfg.model.init_skip == ["roi_heads.box_predictor.*", "*.cls_logits.*"]


# -- end to end: train.py on 3 classes, then fine-tuned to 5 on another synthetic set -------------------

def five_class_set(out) -> dict:
    """The synthetic 'hard' preset (10 shapes, other images than the 'shapes' set) with its classes folded
    to 5: shape k and shape k + 5 become class k (make_synthetic_coco writes 3 or 10 classes, not 5)."""
    from hvdet.data.synthetic import make_synthetic_coco

    paths = make_synthetic_coco(out, num_train=8, num_val=2, image_size=64, seed=1, preset="hard", masks=False)
    for split in ("train", "val"):
        ann_file = Path(paths[f"{split}_ann"])
        data = json.loads(ann_file.read_text())
        for ann in data["annotations"]:
            ann["category_id"] = (ann["category_id"] - 1) % 5 + 1
        data["categories"] = [{**c, "name": f"class{c['id']}"} for c in data["categories"] if c["id"] <= 5]
        ann_file.write_text(json.dumps(data))
    return paths


def test_train_3_classes_then_fine_tune_to_5_on_another_set(tmp_path):
    """Two single-process train.py runs of 2 iterations each at 64 px (no evaluation); the second starts from
    the first's output_dir. train.py runs go through the harness, so tests/conftest.py marks this multirank."""
    from hvdet.data.synthetic import make_synthetic_coco
    from tests.test_train import tiny_overrides, train_py

    shapes = make_synthetic_coco(tmp_path / "shapes", num_train=8, num_val=2, image_size=64, masks=False)
    quick = ["model.norm=local", "eval.at_end=false", "log.tensorboard=false"]
    train_py([*tiny_overrides(shapes, tmp_path / "three", iterations=2), *quick])
    assert (tmp_path / "three" / "checkpoints" / "iter_0000002.pt").is_file()

    out = tmp_path / "five"
    log = train_py([*tiny_overrides(five_class_set(tmp_path / "hard"), out, iterations=2), *quick,
                    f"model.init_from={tmp_path / 'three'}", "model.init_skip=[rpn.head.cls_logits.*]"])
    source = tmp_path / "three" / "checkpoints" / "iter_0000002.pt"
    line = next(x for x in log.splitlines() if x.startswith("model.init_from"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    init = [r for r in records if r["type"] == "init_from"]
    assert len(init) == 1 and init[0]["path"] == str(source), records
    counts = init[0]["counts"]
    assert counts["reinitialized"] == 4 and counts["skipped"] == 2 and counts["missing"] == counts["unexpected"] == 0
    assert sorted(init[0]["reinitialized"]) == sorted(CLASS_HEADS)
    assert line.startswith(f"model.init_from {source}: {counts['loaded']} tensors loaded, 2 skipped")
    assert [r["iteration"] for r in records if r["type"] == "train"] == [2]  # and training ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2
    weights = torch.load(out / "checkpoints" / "iter_0000002.pt", map_location="cpu", weights_only=False)["model"]
    assert weights["roi_heads.box_predictor.cls_score.weight"].shape[0] == 6  # 5 classes + background

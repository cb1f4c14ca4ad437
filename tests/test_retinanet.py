"""RetinaNet as a model family: its heads are AGVM modules of their own, and a 2-rank run with
Cross-GPU BN, PMD-LAMB and AGVM trains and evaluates on the synthetic set under horovodrun."""
import json

import pytest
import torch

from hvdet.config import load_config
from hvdet.models import build_detector, module_map
from hvdet.optim import param_groups
from hvdet.plan import plan_run
from tests.harness import ROOT
from tests.test_train import tiny_overrides, train_py


def test_retinanet_parameters_map_to_detector_modules():
    model = build_detector("retinanet_resnet18_fpn_fast", 5, norm="local", trainable_backbone_layers=5)
    retinanet = module_map("retinanet_resnet18_fpn_fast")
    modules = {retinanet.module_of(name) for name, _ in model.named_parameters()}
    assert modules == {"backbone", "fpn", "head_cls", "head_reg"}  # nothing falls into "other"
    names = {g["name"] for g in param_groups(model, 1e-4, per_module=True, modules=retinanet)}
    assert {"head_cls", "head_reg", "head_cls.no_decay", "head_reg.no_decay"} <= names


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "retinanet_resnext50_32x4d_fpn"])
def test_full_size_retinanet_is_torchvisions(arch):
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = build_detector(arch, 91, norm="local", trainable_backbone_layers=5)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    mine, theirs = model.state_dict(), reference.state_dict()
    heads = [k for k in theirs if not k.startswith("backbone.body.")]
    assert all(tuple(mine[k].shape) == tuple(theirs[k].shape) for k in heads)  # FPN P3-P7 and the heads
    if arch == "retinanet_resnext50_32x4d_fpn":
        from torchvision.models import resnext50_32x4d

        body = {k: v.shape for k, v in resnext50_32x4d().state_dict().items() if not k.startswith("fc.")}
        assert {k[len("backbone.body."):]: v.shape for k, v in mine.items() if k.startswith("backbone.body.")} == body
    else:
        assert mine.keys() == theirs.keys()


def test_mlperf_recipe_at_mlperf_scale():
    cfg = load_config(ROOT / "configs" / "mlperf_retinanet.yaml")
    plan = plan_run(cfg, 64, 1_170_301)  # MLPerf's Open Images training subset
    assert (plan.global_batch, plan.lr, plan.max_iters) == (256, pytest.approx(8e-4), 27429)
    assert cfg.solver.optimizer == "adam" and cfg.solver.weight_decay == 0.0 and cfg.target == {"bbox": 0.34}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, image_size=64)


def test_two_ranks_train_and_evaluate_retinanet_with_cgbn_pmdlamb_and_agvm(data, tmp_path):
    train_py([*tiny_overrides(data, tmp_path, iterations=4), "model.arch=retinanet_resnet18_fpn_fast",
              "model.norm=cross_gpu", "solver.optimizer=pmdlamb", "agvm.enabled=true", "agvm.interval=2"], np=2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["arch"] == "retinanet_resnet18_fpn_fast" and summary["iterations"] == 4
    assert summary["stop"] == "max_iters" and 0.0 <= summary["best"]["bbox"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["losses"] for r in records if r["type"] == "train"]
    assert set(losses[0]) == {"classification", "bbox_regression"} and all(
        torch.isfinite(torch.tensor(list(x.values()))).all() for x in losses)
    last = [r for r in records if r["type"] == "train"][-1]  # AGVM's variances and scales, per head module
    assert {"head_cls", "head_reg"} <= set(last["agvm_variance"]) and set(last["agvm_lr_scale"]) == set(
        last["agvm_variance"]) and all(v >= 0 for v in last["agvm_variance"].values())

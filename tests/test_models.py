"""hvdet.models: every arch builds, full-size models equal torchvision's, fast variants train, norm modes,
local backbone weights."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from hvdet.models import ARCHS, FastDesign, build_detector, load_backbone
from tests.harness import run_ranks

FAST_ARCHS = [a for a, spec in ARCHS.items() if spec.fast]


@pytest.fixture(autouse=True)
def one_thread():
    # The machine is shared by several test runs; one thread each, as the ranks get.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def batch(n_images=2, size_px=128, seed=0):
    """Images in [0, 1] with 1-2 boxes of 20-64 px and matching box masks."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n_images):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 40.0, 100.0, 64.0]])[: 1 + i % 2]
        masks = torch.zeros(len(boxes), size_px, size_px, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, size_px, size_px, generator=g))
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3])[: len(boxes)], "masks": masks})
    return images, targets


def norm_types(model):
    return {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


# -- full-size archs: torchvision's models, unchanged --------------------------------------------

@pytest.mark.parametrize("arch,reference", [
    ("fasterrcnn_resnet50_fpn", torchvision.models.detection.fasterrcnn_resnet50_fpn),
    ("maskrcnn_resnet50_fpn", torchvision.models.detection.maskrcnn_resnet50_fpn),
])
def test_r50_equals_torchvision_builder(arch, reference):
    # Oracle: torchvision's own builder without weights (BatchNorm2d, all 5 stages trainable).
    theirs = reference(weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=64).eval()
    ours = build_detector(arch, 5, norm="local", trainable_backbone_layers=5, min_size=64, max_size=64).eval()
    ref_state = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
    for attr in ("pre_nms_top_n", "post_nms_top_n", "nms_thresh", "score_thresh"):
        assert getattr(ours.rpn, f"_{attr}" if attr.endswith("top_n") else attr) == \
            getattr(theirs.rpn, f"_{attr}" if attr.endswith("top_n") else attr)
    assert ours.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    ours.load_state_dict(ref_state)
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        out_ours, out_theirs = ours(image)[0], theirs(image)[0]
    assert out_ours.keys() == out_theirs.keys()
    for key in out_ours:
        torch.testing.assert_close(out_ours[key], out_theirs[key])


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet101_fpn", "maskrcnn_resnet101_fpn"])
def test_r101_builds_and_runs(arch):
    model = build_detector(arch, 3, min_size=64, max_size=64).eval()
    reference = resnet_fpn_backbone(backbone_name="resnet101", weights=None)
    assert {k: v.shape for k, v in model.backbone.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert norm_types(model) == {FrozenBatchNorm2d}
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert {"boxes", "scores", "labels"} <= out.keys()
    assert ("masks" in out) == arch.startswith("mask")


def test_default_sizes():
    assert build_detector("fasterrcnn_resnet50_fpn", 3).transform.max_size == 1333
    fast = build_detector("fasterrcnn_resnet18_fpn_fast", 3)
    assert fast.transform.min_size == (128,) and fast.transform.max_size == 213


# -- fast archs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", FAST_ARCHS)
@pytest.mark.parametrize("norm", ["frozen", "local"])
def test_fast_train_step_finite(arch, norm):
    torch.manual_seed(0)
    model = build_detector(arch, 4, norm=norm).train()
    assert norm_types(model) == {FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d}
    images, targets = batch()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert losses.keys() == expected | ({"loss_mask"} if arch.startswith("mask") else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.roi_heads.box_head.fc6.out_features == 256  # the narrow box head
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_fast_overrides_and_frozen_stages():
    model = build_detector("fasterrcnn_resnet18_fpn_fast", 4, box_batch_size_per_image=16,
                           rpn_post_nms_top_n_train=50, trainable_backbone_layers=2)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    assert model.rpn._post_nms_top_n["training"] == 50
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3"}  # the top 2 stages are layer3 and layer4, and the fast body has no layer4
    assert not hasattr(model.backbone.body, "layer4")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'resnet9'"):
        build_detector("resnet9", 3)
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, norm="group")
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 1)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, trainable_backbone_layers=6)
    with pytest.raises(ValueError, match="bn_group_size=2 only applies to norm='cross_gpu'"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, norm="local", bn_group_size=2)
    with pytest.raises(ValueError, match="one tuple of anchor sizes per FPN level"):
        FastDesign(anchor_sizes=((16,), (32,), (64,)))


# -- pretrained backbone from a local file --------------------------------------------------------

def test_pretrained_backbone_loads(tmp_path):
    torch.manual_seed(3)
    resnet18 = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        resnet18.bn1.running_mean.uniform_()
    path = tmp_path / "r18.pth"
    torch.save(resnet18.state_dict(), path)
    for norm in ("frozen", "local"):
        model = build_detector("fasterrcnn_resnet18_fpn_fast", 3, norm=norm, pretrained_backbone=path)
        body = model.backbone.body
        torch.testing.assert_close(body.conv1.weight, resnet18.conv1.weight)
        torch.testing.assert_close(body.layer3[1].conv2.weight, resnet18.layer3[1].conv2.weight)
        torch.testing.assert_close(body.bn1.running_mean, resnet18.bn1.running_mean)
    # A training checkpoint with a wrapper prefix loads too; fc and layer4 (unused by the fast body) are ignored.
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.backbone.body.{k}": v for k, v in resnet18.state_dict().items()}}, wrapped)
    model = build_detector("fasterrcnn_resnet18_fpn_fast", 3)
    counts = load_backbone(model, wrapped)
    assert counts["ignored"] > 0 and counts["loaded"] == len(model.backbone.body.state_dict())
    torch.testing.assert_close(model.backbone.body.layer2[0].conv1.weight, resnet18.layer2[0].conv1.weight)


def test_pretrained_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, pretrained_backbone=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth.*not a readable torch state dict"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, pretrained_backbone=garbage)
    wrong_depth = tmp_path / "r34.pth"  # same tensor names as R18 in layer1, more blocks, but a ...
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)  # ... shape that does not fit
    del state["layer3.1.bn2.weight"]
    torch.save(state, wrong_depth)
    with pytest.raises(ValueError, match=r"r34.pth.*1 of .* missing.*layer3.1.bn2.weight.*1 shape mismatches"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, pretrained_backbone=wrong_depth)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="list.pth.*not a state dict"):
        build_detector("fasterrcnn_resnet18_fpn_fast", 3, pretrained_backbone=not_a_dict)


# -- cross_gpu norm: MegDet CGBN over 2 real ranks ------------------------------------------------

def case_cross_gpu_step():
    from hvdet import comm
    from hvdet.nn import CrossGPUBatchNorm2d

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on both ranks
    model = build_detector("fasterrcnn_resnet18_fpn_fast", 4, norm="cross_gpu", bn_group_size=2).train()
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d,
                                                                          CrossGPUBatchNorm2d))}
    images, targets = batch(seed=comm.rank())  # different images per rank
    losses = model(images, targets)
    sum(losses.values()).backward()
    bn = model.backbone.body.layer3[0].bn1
    return {"kinds": kinds, "finite": all(torch.isfinite(v).item() for v in losses.values()),
            "running_mean": bn.running_mean.clone()}


def test_cross_gpu_norm_two_ranks():
    results = run_ranks("tests.test_models:case_cross_gpu_step", np=2, launcher="horovodrun")
    for r in results:
        assert r["kinds"] == {"CrossGPUBatchNorm2d"} and r["finite"]
    # Statistics are computed over the group of both ranks, so both ranks hold the same running mean.
    torch.testing.assert_close(results[0]["running_mean"], results[1]["running_mean"])

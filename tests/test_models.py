"""hvdet.models: full-size models equal torchvision's own builders, fast variants have torchvision's ResNet-18 body
and train, norm modes, local backbone weights. The oracles are torchvision's public constructors, never the
functions hvdet.models itself calls to assemble a model."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from hvdet.models import ARCHS, FastDesign, build_detector, load_backbone
from tests.harness import run_ranks

FAST_ARCHS = [a for a, spec in ARCHS.items() if spec.fast and spec.family != "retinanet"]  # R-CNN's fast body


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
# The oracle is torchvision's public builders (fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn), not the
# parts hvdet assembles. They build FrozenBatchNorm2d and honour trainable_backbone_layers only when given
# backbone weights, which would be downloaded: ResNet50_Weights.get_state_dict is patched to hand them a
# random local ResNet-50 state dict, so they take their pretrained-backbone path offline. Without weights
# they build nn.BatchNorm2d with every stage trainable: the norm="local", 5-stage case.

TORCHVISION_BUILDERS = {"fasterrcnn_resnet50_fpn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
                        "maskrcnn_resnet50_fpn": torchvision.models.detection.maskrcnn_resnet50_fpn}


def resnet_state(depth, seed=0):
    """A torchvision ResNet's state dict with random, non-default BN affine parameters and statistics."""
    torch.manual_seed(seed)
    resnet = torchvision.models.__dict__[f"resnet{depth}"](weights=None)
    with torch.no_grad():
        for bn in (m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
    return resnet.state_dict()


def torchvision_detector(arch, norm, trainable, monkeypatch, **kwargs):
    builder = TORCHVISION_BUILDERS[arch]
    if norm == "local":
        assert trainable == 5, "torchvision builds BatchNorm2d only without backbone weights, all stages trainable"
        return builder(weights=None, weights_backbone=None, **kwargs)
    state = resnet_state(50)
    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", lambda self, *a, **k: state)
    return builder(weights=None, weights_backbone=torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                   trainable_backbone_layers=trainable, **kwargs)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_BUILDERS))
@pytest.mark.parametrize(("norm", "trainable"), [("frozen", 3), ("frozen", 0), ("local", 5)])
def test_r50_equals_torchvision_builder(arch, norm, trainable, monkeypatch):
    theirs = torchvision_detector(arch, norm, trainable, monkeypatch, num_classes=5, min_size=64, max_size=64).eval()
    ours = build_detector(arch, 5, norm=norm, trainable_backbone_layers=trainable, min_size=64, max_size=64).eval()
    ref_state = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    assert norm_types(ours) == norm_types(theirs) == {FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d}
    # The same frozen set, tensor by tensor (a frozen stem and stages under FrozenBatchNorm2d, the heads train).
    assert trainable_names(ours) == trainable_names(theirs)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    for attr in ("_pre_nms_top_n", "_post_nms_top_n", "nms_thresh", "score_thresh"):
        assert getattr(ours.rpn, attr) == getattr(theirs.rpn, attr), attr
    assert ours.roi_heads.fg_bg_sampler.batch_size_per_image == theirs.roi_heads.fg_bg_sampler.batch_size_per_image
    ours.load_state_dict(ref_state)  # strict: the same tensors by name
    for model in (ours, theirs):  # fewer proposals than at 800 px, the same on both: the CPU is slow
        model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 200, 50
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        out_ours, out_theirs = ours(image)[0], theirs(image)[0]
    assert out_ours.keys() == out_theirs.keys() and len(out_theirs["boxes"]) > 0
    for key in out_ours:
        torch.testing.assert_close(out_ours[key], out_theirs[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet101_fpn", "maskrcnn_resnet101_fpn"])
def test_r101_is_torchvision_r101_under_torchvisions_r50_heads(arch, monkeypatch):
    """torchvision has no R101 detector builder: the body must be torchvision's resnet101 (without fc) and
    everything else the R50 builder's (the FPN sees the same C2-C5 widths), with the same frozen stages."""
    model = build_detector(arch, 3, min_size=64, max_size=64).eval()
    r50 = torchvision_detector(arch.replace("101", "50"), "frozen", 3, monkeypatch, num_classes=3)
    body = torchvision.models.resnet101(weights=None, norm_layer=FrozenBatchNorm2d)
    want = {k: v.shape for k, v in r50.state_dict().items() if not k.startswith("backbone.body.")}
    want.update({f"backbone.body.{k}": v.shape for k, v in body.state_dict().items() if not k.startswith("fc.")})
    assert {k: v.shape for k, v in model.state_dict().items()} == want
    stages = {n.split(".")[2] for n in trainable_names(r50) if n.startswith("backbone.body.")}
    assert {n.split(".")[2] for n in trainable_names(model) if n.startswith("backbone.body.")} == stages
    assert norm_types(model) == {FrozenBatchNorm2d}
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 200, 50
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


FAST_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3")  # the fast body stops at C4: no layer4, no fc


@pytest.mark.parametrize("norm", ["frozen", "local"])
@pytest.mark.parametrize("trainable", [0, 2, 3, 5])
def test_fast_body_is_torchvisions_resnet18_with_its_frozen_stages(norm, trainable):
    """Oracle: torchvision's resnet18 with the same norm layer, cut after layer3, frozen by torchvision's
    own backbone extractor (backbone_utils._resnet_fpn_extractor, which hvdet's fast path does not call):
    the same tensors and shapes, the same trainable set, and the same C3/C4 features from the same weights."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    model = build_detector("fasterrcnn_resnet18_fpn_fast", 3, norm=norm, trainable_backbone_layers=trainable).eval()
    body = model.backbone.body
    resnet18 = torchvision.models.resnet18(weights=None, norm_layer=norm_layer).eval()
    resnet18.load_state_dict(resnet_state(18), strict=norm == "local")  # FrozenBatchNorm2d: no num_batches_tracked
    want = {k: v for k, v in resnet18.state_dict().items() if k.split(".")[0] in FAST_STAGES}
    assert {k: v.shape for k, v in body.state_dict().items()} == {k: v.shape for k, v in want.items()}
    reference = _resnet_fpn_extractor(torchvision.models.resnet18(weights=None, norm_layer=norm_layer), trainable)
    assert trainable_names(body) == {n for n in trainable_names(reference.body) if n.split(".")[0] in FAST_STAGES}
    body.load_state_dict(want)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = body(x)
        c2 = resnet18.layer1(resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x)))))
        c3 = resnet18.layer2(c2)
        c4 = resnet18.layer3(c3)
    assert [f.shape for f in features.values()] == [c3.shape, c4.shape]
    for got, expected in zip(features.values(), (c3, c4), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The FPN's lateral 1x1 convs take exactly the widths of torchvision's layer2 and layer3 outputs.
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [c3.shape[1], c4.shape[1]]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"arch\b.*'resnet9'"):
        build_detector("resnet9", 3)
    with pytest.raises(ValueError, match=r"norm\b.*'group'"):
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


def test_an_hvdet_checkpoint_feeds_pretrained_backbone(tmp_path):
    """A detector checkpoint as hvdet writes it (hvdet.checkpoint.save: the model beside numpy and torch RNG
    states and plain objects) is a starting point: its body loads under torch.load(weights_only=True)."""
    import numpy as np

    from hvdet.checkpoint import FORMAT

    torch.manual_seed(4)
    trained = build_detector("fasterrcnn_resnet18_fpn_fast64", 11, norm="local")
    path = tmp_path / "iter_0000010.pt"
    torch.save({"format": FORMAT, "iteration": 10, "model": trained.state_dict(),
                "rng": {"numpy": np.random.RandomState(0).get_state(), "torch": torch.get_rng_state()},
                "config": {"solver": {"base_lr": 0.4}}}, path)
    fresh = build_detector("fasterrcnn_resnet18_fpn_fast64", 6, norm="frozen", pretrained_backbone=path)
    torch.testing.assert_close(fresh.backbone.body.layer3[0].conv1.weight, trained.backbone.body.layer3[0].conv1.weight)
    torch.testing.assert_close(fresh.backbone.body.bn1.running_var, trained.backbone.body.bn1.running_var)
    assert not torch.equal(fresh.backbone.fpn.inner_blocks[0][0].weight, trained.backbone.fpn.inner_blocks[0][0].weight)


def test_the_64px_variant_halves_the_sizes():
    model = build_detector("fasterrcnn_resnet18_fpn_fast64", 4)
    assert model.transform.min_size == (64,) and model.transform.max_size == 107
    assert model.rpn.anchor_generator.sizes == ((8, 16), (32, 48))
    assert model.roi_heads.box_roi_pool.canonical_scale == 18
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16 and model.rpn._post_nms_top_n["testing"] == 100


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


def test_cuda_graphs_wiring_on_cpu(monkeypatch):
    """solver.cuda_graphs without CUDA: a clear error; its forward keeps the backbone's state_dict and
    parameters and runs eagerly for what a graph does not take (CPU tensors, evaluation), equal to
    the backbone's own forward; a valid recipe passes the checks. The graphs themselves: tests/test_gpu.py."""
    from hvdet.config import from_dict
    from hvdet.models.cuda_graphs import GraphedForward, check_capturable, graph_backbone

    model = build_detector("fasterrcnn_resnet18_fpn_fast", 3, norm="local")
    keys = model.state_dict().keys()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="solver.cuda_graphs needs a CUDA device"):
        graph_backbone(model)
    x = torch.rand(2, 3, 64, 64)
    want = model.backbone(x)
    model.backbone.forward = GraphedForward(model.backbone)
    got = model.backbone(x)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.state_dict().keys() == keys and not model.backbone.forward.graphs
    from_dict({"solver": {"max_iters": 5, "cuda_graphs": True}, "model": {"norm": "cross_gpu"},
               "data": {"augmentation": "lsj"}, "bn": {"backend": "torch"}})
    check_capturable(model.backbone)  # momentum 0.1 everywhere: capturable
    model.backbone.body.bn1.momentum = None
    with pytest.raises(RuntimeError, match="'body.bn1' has momentum=None"):
        check_capturable(model.backbone)

"""Detectors: torchvision Faster R-CNN / Mask R-CNN on a ResNet-FPN backbone, with a norm mode.

    model = build_detector("maskrcnn_resnet50_fpn", num_classes=81, norm="cross_gpu", bn_group_size=8)

Two families of architectures:

* ``{faster,mask}rcnn_resnet{50,101}_fpn``: torchvision's models as they are (FPN P2-P6, 256 channels,
  2000/1000 proposals, 512 RoIs per image, 7x7 RoIAlign, 1024-wide box head), so results compare
  with the papers' setups.
* ``{faster,mask}rcnn_resnet18_fpn_fast``: the CPU variants the demo and the tests train. Every
  choice in :class:`FastDesign` cuts work that an easy dataset (objects of 15-50% of a 128-px image)
  does not need; ``benchmarks/model_step.py`` measures the effect (docs/models.md has the numbers).
  ``fasterrcnn_resnet18_fpn_fast64`` is the same at 64 px (:data:`FAST64`: anchors, RoIAlign's
  canonical scale and the image sizes halved), the batch-size study's model.
* ``retinanet_*``: the one-stage family (:mod:`hvdet.retinanet`). Families are entries of
  :data:`hvdet.registry.FAMILIES`, architectures of :data:`hvdet.registry.ARCHS`.

Norm modes (MegDet, Sec. 3.3: BN with few images per GPU is what large-batch detection has to fix):

* ``frozen``: ``torchvision.ops.FrozenBatchNorm2d`` (affine and statistics fixed; the usual choice
  when fine-tuning from an ImageNet backbone with 1-2 images per GPU);
* ``local``: ``nn.BatchNorm2d`` over this rank's images only;
* ``cross_gpu``: MegDet Cross-GPU BN: statistics over ``bn_group_size`` consecutive ranks
  (``hvdet.nn.convert_cross_gpu_bn``).

Weights are never downloaded: ``pretrained_backbone`` is an optional local ``.pth`` file with a
ResNet state dict, loaded into the backbone body. A whole trained detector is ``model.init_from``'s
(:mod:`hvdet.finetune`, applied by :func:`hvdet.builders.build_run` after this).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from hvdet.registry import ARCHS, FAMILIES, NORMS, Arch


@dataclass(frozen=True)
class FastDesign:
    """The CPU variant, sized for 128-px images with objects of 20-64 px.

    At torchvision's defaults a step on 8 such images costs 10.5 s on one thread, 52% of it in the
    CPU ``roi_align`` backward (2000 proposals -> 512 sampled RoIs per image, 7x7 bins, 256 channels).
    RoIAlign work is RoIs x bins x channels, so all three shrink here; the rest follows the objects.
    """

    returned_layers: tuple[int, ...] = (2, 3)  # C3, C4 (strides 8, 16): 20-64 px objects need no
    #   stride-4 map (C2 is 4x the pixels of C3) and no stride-32 map; layer4 is then never built.
    pool_level: bool = False  # torchvision adds a max-pooled top level ("pool"); not needed here
    fpn_channels: int = 64  # FPN width; the RPN head, RoIAlign and box head all scale with it
    anchor_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 96))  # px per level, covering 20-96 px
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    roi_output_size: int = 5  # 5x5 bins instead of 7x7: half the RoIAlign and box-head input
    roi_canonical_scale: int = 36  # torchvision's 224 px at 800-px inputs, scaled to 128 px
    representation_size: int = 256  # TwoMLPHead width (torchvision: 1024)
    mask_roi_output_size: int = 14  # as torchvision: 28x28 mask targets
    mask_layers: tuple[int, ...] = (64, 64)  # torchvision: 4 x 256
    min_size: int = 128
    max_size: int = 213  # torchvision's 1333/800 aspect cap at a 128-px shorter side
    # Sampling and proposal counts (torchvision: 2000/1000 pre-NMS per level, 2000/1000 post-NMS,
    # 256 RPN anchors and 512 RoIs sampled per image). A few objects per image need far fewer.
    detector_kwargs: tuple[tuple[str, object], ...] = (
        ("rpn_pre_nms_top_n_train", 300), ("rpn_pre_nms_top_n_test", 300),
        ("rpn_post_nms_top_n_train", 100), ("rpn_post_nms_top_n_test", 100),
        ("rpn_batch_size_per_image", 128), ("box_batch_size_per_image", 32),
    )

    def __post_init__(self):
        levels = len(self.returned_layers) + self.pool_level
        if len(self.anchor_sizes) != levels or len({len(s) for s in self.anchor_sizes}) != 1:
            # torchvision's RPN head shares one conv over all levels: same anchor count everywhere.
            raise ValueError(f"FastDesign needs one tuple of anchor sizes per FPN level ({levels}), all of the "
                             f"same length; got {self.anchor_sizes}")


FAST = FastDesign()
# The 64-px variant (the batch-size study's, docs/study.md): objects of 3-38 px, so every size halves;
# the stride-8 and -16 maps are 8x8 and 4x4. At 64 px the convolutions are no longer most of a step
# (RoIAlign's CPU backward was 23%), so training samples half the proposals and RoIs (at most 12
# objects an image); evaluation keeps the 128-px variant's 100 proposals. A step on 8 images: 107 ms
# on one thread against 132 ms with the 128-px sampling (the 128-px model: about 190 ms).
FAST64 = FastDesign(anchor_sizes=((8, 16), (32, 48)), roi_canonical_scale=18, min_size=64, max_size=107,
                    detector_kwargs=(("rpn_pre_nms_top_n_train", 150), ("rpn_pre_nms_top_n_test", 300),
                                     ("rpn_post_nms_top_n_train", 50), ("rpn_post_nms_top_n_test", 100),
                                     ("rpn_batch_size_per_image", 64), ("box_batch_size_per_image", 16)))
FAST_DESIGNS = {128: FAST, 64: FAST64}  # Arch.image_px -> its design


def build_detector(arch: str, num_classes: int, *, norm: str = "frozen", bn_group_size: int | None = None,
                   min_size: int | None = None, max_size: int | None = None,
                   pretrained_backbone: str | os.PathLike | None = None, trainable_backbone_layers: int = 3,
                   fast_design: FastDesign | None = None, **overrides) -> nn.Module:
    """A torchvision detector for ``num_classes`` classes (background included).

    ``min_size`` / ``max_size`` (resize of the shorter / longer image side) default to the arch's:
    800 / 1333 for the full-size models, 128 / 213 for the ``_fast`` ones. ``overrides`` are passed to
    torchvision's ``FasterRCNN`` / ``MaskRCNN`` (``rpn_pre_nms_top_n_train``, ``box_batch_size_per_image``,
    ...) and win over the fast design's values. ``trainable_backbone_layers`` (0-5) counts ResNet
    stages from the top that train; the others are frozen as in torchvision. ``fast_design`` replaces
    the ``_fast`` archs' :class:`FastDesign` (benchmarks use it for ablations; default: the arch's,
    :data:`FAST_DESIGNS`).
    """
    spec = ARCHS[arch]  # an unknown arch or norm: ValueError naming the closest
    NORMS[norm]
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background class too and must be >= 2, got {num_classes}")
    if bn_group_size is not None and norm != "cross_gpu":
        raise ValueError(f"bn_group_size={bn_group_size} only applies to norm='cross_gpu', not {norm!r}")
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}")
    # cross_gpu starts from ordinary BN layers and converts them below, keeping their parameters.
    norm_layer = NORMS.load("local" if norm == "cross_gpu" else norm)
    fast_design = fast_design or FAST_DESIGNS[spec.image_px]
    model = FAMILIES.load(spec.family)(spec, num_classes, norm_layer, trainable_backbone_layers, min_size, max_size,
                                       overrides, fast_design)
    if pretrained_backbone is not None:
        load_backbone(model, pretrained_backbone)
    if norm == "cross_gpu":
        from hvdet.nn import convert_cross_gpu_bn  # lazily: hvdet.nn needs a launched comm layer

        model = convert_cross_gpu_bn(model, group_size=bn_group_size)
        # The frozen stages stay frozen whatever the converted layers' parameters default to.
        _freeze_stages(model.backbone.body, trainable_backbone_layers)
    return model


def build_rcnn(spec: Arch, num_classes: int, norm_layer, trainable_layers: int, min_size: int | None,
               max_size: int | None, overrides: dict, fast_design: FastDesign) -> nn.Module:
    """Faster / Mask R-CNN: torchvision's ResNet-FPN models, or the fast CPU variant."""
    if spec.fast:
        return _build_fast(spec, fast_design, num_classes, norm_layer, trainable_layers, min_size, max_size, overrides)
    backbone = resnet_fpn_backbone(backbone_name=spec.backbone, weights=None, norm_layer=norm_layer,
                                   trainable_layers=trainable_layers)
    detector = MaskRCNN if spec.mask else FasterRCNN
    return detector(backbone, num_classes=num_classes, min_size=min_size or 800, max_size=max_size or 1333, **overrides)


def fast_backbone(spec: Arch, d: FastDesign, norm_layer, trainable_layers: int, extra_blocks=None) -> BackboneWithFPN:
    """The fast variant's backbone: the ResNet body up to ``d.returned_layers`` under a narrow FPN."""
    body = resnet.__dict__[spec.backbone](weights=None, norm_layer=norm_layer)
    _freeze_stages(body, trainable_layers)
    in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in d.returned_layers]  # torchvision's rule
    if extra_blocks is None:
        extra_blocks = LastLevelMaxPool() if d.pool_level else _NoExtraLevel()
    return BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(d.returned_layers)},
                           in_channels, d.fpn_channels, extra_blocks=extra_blocks)


class _NoExtraLevel(ExtraFPNBlock):
    """No pooled top level: the fast FPN ends at its last returned stage."""

    def forward(self, results, x, names):
        return results, names


def _build_fast(spec: Arch, d: FastDesign, num_classes: int, norm_layer, trainable_layers: int,
                min_size: int | None, max_size: int | None, overrides: dict) -> nn.Module:
    backbone = fast_backbone(spec, d, norm_layer, trainable_layers)
    levels = [str(i) for i in range(len(d.returned_layers))]
    anchors = AnchorGenerator(d.anchor_sizes, (d.aspect_ratios,) * len(d.anchor_sizes))
    box_pool = MultiScaleRoIAlign(levels, d.roi_output_size, sampling_ratio=2,
                                  canonical_scale=d.roi_canonical_scale)
    kwargs = dict(
        num_classes=None,  # the predictor below carries the class count
        min_size=min_size or d.min_size, max_size=max_size or d.max_size,
        rpn_anchor_generator=anchors, box_roi_pool=box_pool,
        box_head=TwoMLPHead(d.fpn_channels * d.roi_output_size ** 2, d.representation_size),
        box_predictor=FastRCNNPredictor(d.representation_size, num_classes),
        **dict(d.detector_kwargs),
    )
    if not spec.mask:
        return FasterRCNN(backbone, **{**kwargs, **overrides})
    mask_pool = MultiScaleRoIAlign(levels, d.mask_roi_output_size, sampling_ratio=2,
                                   canonical_scale=d.roi_canonical_scale)
    mask_head = MaskRCNNHeads(d.fpn_channels, d.mask_layers, dilation=1)
    mask_predictor = MaskRCNNPredictor(d.mask_layers[-1], d.mask_layers[-1], num_classes)
    return MaskRCNN(backbone, mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=mask_predictor,
                    **{**kwargs, **overrides})


def _freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` ResNet stages, exactly as torchvision does."""
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(stage) for stage in train):
            param.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Pretrained backbone from a local file
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "backbone.body.", "body.", "backbone.")


def load_backbone(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a ResNet state dict from the local file ``path`` into ``model.backbone.body``.

    Accepts a plain state dict (``torchvision.models.resnet50().state_dict()``) or a checkpoint with
    it under ``"model"`` / ``"state_dict"``; ``module.`` / ``backbone.body.`` prefixes are stripped.
    Tensors the body does not have (``fc.*``, ``layer4.*`` of a fast model) are ignored; a missing
    tensor or a shape mismatch is an error naming the file. Returns ``{"loaded", "ignored"}`` counts.
    """
    from hvdet.checkpoint import read_weights_only  # lazily: hvdet.checkpoint imports the comm layer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_backbone file {path!r} does not exist")
    try:
        # weights_only: no code runs from the file. hvdet's own checkpoints also hold numpy RNG states,
        # whose few numpy types are allowed by name, so a finished run can be a starting point.
        state = read_weights_only(path)
    except Exception as err:  # a truncated or non-torch file: say which one
        raise ValueError(f"pretrained_backbone file {path!r} is not a readable torch state dict: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained_backbone file {path!r} holds a {type(state).__name__}, not a state dict "
                         "of tensors")
    state = {_strip(k): v for k, v in state.items()}
    body = model.backbone.body
    expected = body.state_dict()
    # BatchNorm2d has num_batches_tracked, FrozenBatchNorm2d has not; neither matters for loading.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problems = ([f"{len(missing)} of {len(expected)} backbone tensors missing (e.g. {missing[:3]})"] if missing
                    else []) + ([f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})"] if wrong else [])
        raise ValueError(f"pretrained_backbone file {path!r} does not fit this ResNet body: "
                         + "; ".join(problems) + " -- is it a state dict of the same ResNet depth?")
    usable = {k: v for k, v in state.items() if k in expected}
    body.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "ignored": len(state) - len(usable)}


def _strip(key: str) -> str:
    stripped = True
    while stripped:  # "module.backbone.body.conv1.weight" -> "conv1.weight"
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


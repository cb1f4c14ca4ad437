"""Faster / Mask R-CNN: torchvision's ResNet-FPN models as they are, or the fast CPU variant of
:class:`hvdet.models.design.FastDesign`."""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from hvdet.models.backbone import BACKBONE_PREFIXES, fast_backbone
from hvdet.models.design import FastDesign
from hvdet.models.family import Family
from hvdet.optim.build import ModuleMap
from hvdet.registry import Arch


def build_rcnn(spec: Arch, num_classes: int, norm_layer, trainable_layers: int, min_size: int | None,
               max_size: int | None, overrides: dict, fast_design: FastDesign) -> nn.Module:
    """Faster / Mask R-CNN: torchvision's ResNet-FPN models, or the fast CPU variant."""
    if spec.fast:
        return _build_fast(spec, fast_design, num_classes, norm_layer, trainable_layers, min_size, max_size, overrides)
    backbone = resnet_fpn_backbone(backbone_name=spec.backbone, weights=None, norm_layer=norm_layer,
                                   trainable_layers=trainable_layers)
    detector = MaskRCNN if spec.mask else FasterRCNN
    return detector(backbone, num_classes=num_classes, min_size=min_size or 800, max_size=max_size or 1333, **overrides)


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


# torchvision's attribute names (the first match wins).
MODULES = ModuleMap(prefixes=(*BACKBONE_PREFIXES, ("rpn.", "rpn"),
                              ("roi_heads.box_head.", "roi_box"), ("roi_heads.box_predictor.", "roi_box"),
                              ("roi_heads.mask_head.", "roi_mask"), ("roi_heads.mask_predictor.", "roi_mask")),
                    order=("backbone", "fpn", "rpn", "roi_box", "roi_mask"))
FAMILY = Family(build_rcnn, MODULES)

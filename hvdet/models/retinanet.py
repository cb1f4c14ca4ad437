"""RetinaNet (Lin et al., focal loss), MLPerf Training's object-detection benchmark, as a model family.

* ``retinanet_resnet50_fpn``: torchvision's RetinaNet as it is (FPN P3-P7 of 256 channels from C3-C5
  plus two extra levels, 9 anchors per location, 4-conv heads).
* ``retinanet_resnext50_32x4d_fpn``: the same on ResNeXt-50 32x4d, the backbone MLPerf uses.
* ``retinanet_resnet18_fpn_fast``: the CPU variant on the fast backbone of
  :class:`hvdet.models.design.FastDesign` (C3-C4, 64-channel FPN, its anchor sizes, fewer candidates
  per level).

Norm modes, pretrained backbones and Cross-GPU BN conversion are :func:`hvdet.models.build_detector`'s,
as for R-CNN. The heads' parameters are modules of their own (``head_cls``, ``head_reg``:
:data:`MODULES`), so AGVM gives each its own lr scale.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from hvdet.models.backbone import BACKBONE_PREFIXES, NoExtraLevel, fast_backbone
from hvdet.models.design import FastDesign
from hvdet.models.family import Family
from hvdet.optim.build import ModuleMap
from hvdet.registry import Arch

# The fast variant keeps 100 detections from 300 candidates per level (torchvision: 300 from 1000).
FAST_KWARGS = {"topk_candidates": 300, "detections_per_img": 100}


def build_retinanet(spec: Arch, num_classes: int, norm_layer, trainable_layers: int, min_size: int | None,
                    max_size: int | None, overrides: dict, fast_design: FastDesign) -> nn.Module:
    if spec.fast:
        d = fast_design
        backbone = fast_backbone(spec, d, norm_layer, trainable_layers, extra_blocks=NoExtraLevel())
        anchors = AnchorGenerator(d.anchor_sizes, (d.aspect_ratios,) * len(d.anchor_sizes))
        head = RetinaNetHead(d.fpn_channels, anchors.num_anchors_per_location()[0], num_classes)
        return RetinaNet(backbone, num_classes, min_size=min_size or d.min_size, max_size=max_size or d.max_size,
                         anchor_generator=anchors, head=head, **{**FAST_KWARGS, **overrides})
    # torchvision's retinanet_resnet50_fpn: C3-C5 under the FPN, P6/P7 from P5.
    backbone = resnet_fpn_backbone(backbone_name=spec.backbone, weights=None, norm_layer=norm_layer,
                                   trainable_layers=trainable_layers, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes, min_size=min_size or 800, max_size=max_size or 1333, **overrides)


MODULES = ModuleMap(prefixes=(*BACKBONE_PREFIXES, ("head.classification_head.", "head_cls"),
                              ("head.regression_head.", "head_reg")),
                    order=("backbone", "fpn", "head_cls", "head_reg"))
FAMILY = Family(build_retinanet, MODULES)

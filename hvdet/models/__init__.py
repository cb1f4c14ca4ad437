"""Detectors: torchvision Faster R-CNN / Mask R-CNN on a ResNet-FPN backbone, with a norm mode.

    model = build_detector("maskrcnn_resnet50_fpn", num_classes=81, norm="cross_gpu", bn_group_size=8)

Two families of architectures:

* ``{faster,mask}rcnn_resnet{50,101}_fpn``: torchvision's models as they are (FPN P2-P6, 256 channels,
  2000/1000 proposals, 512 RoIs per image, 7x7 RoIAlign, 1024-wide box head), so results compare
  with the papers' setups.
* ``{faster,mask}rcnn_resnet18_fpn_fast``: the CPU variants the demo and the tests train. Every
  choice in :class:`~hvdet.models.design.FastDesign` cuts work that an easy dataset (objects of
  15-50% of a 128-px image) does not need; ``benchmarks/model_step.py`` measures the effect
  (docs/models.md has the numbers).
  ``fasterrcnn_resnet18_fpn_fast64`` is the same at 64 px (:data:`FAST64`: anchors, RoIAlign's
  canonical scale and the image sizes halved), the batch-size study's model.
* ``retinanet_*``: the one-stage family (:mod:`hvdet.models.retinanet`).

A family (:class:`~hvdet.models.family.Family`: :mod:`.rcnn`, :mod:`.retinanet`) is an entry of
:data:`hvdet.registry.FAMILIES`: its builder and its module map (which parameters are the backbone,
the FPN, each head: :func:`module_map`, for AGVM's groups and the trust-ratio diagnostics).
Architectures are entries of :data:`hvdet.registry.ARCHS`.

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

from torch import nn

from hvdet.models.backbone import load_backbone
from hvdet.models.design import FAST, FAST64, FAST_DESIGNS, FastDesign
from hvdet.models.family import Family
from hvdet.optim.build import ModuleMap
from hvdet.registry import ARCHS, FAMILIES, NORMS

__all__ = ["ARCHS", "FAST", "FAST64", "FAST_DESIGNS", "FastDesign", "build_detector", "family", "load_backbone",
           "module_map"]


def family(arch: str) -> Family:
    """The family of ``arch`` (an unknown arch: ValueError naming the closest)."""
    return FAMILIES.load(ARCHS[arch].family)


def module_map(arch: str) -> ModuleMap:
    """Which module each parameter of an ``arch`` detector belongs to (backbone, fpn, rpn, ...)."""
    return family(arch).modules


def build_detector(arch: str, num_classes: int, *, norm: str = "frozen", bn_group_size: int | None = None,
                   bn_backend: str = "auto", bn_stats: str = "auto", bn_impl: str = "auto",
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
    :data:`FAST_DESIGNS`). ``bn_*``: Cross-GPU BN's group (in ranks; None: all) and its collective
    backend, statistics and implementation (:class:`hvdet.nn.CrossGPUBatchNorm2d`); training builds
    its model here too (:func:`hvdet.builders.build_model`), with the recipe's ``bn`` section.
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
    model = family(arch).build(spec, num_classes, norm_layer, trainable_backbone_layers, min_size, max_size,
                               overrides, fast_design)
    if pretrained_backbone is not None:
        load_backbone(model, pretrained_backbone)
    if norm == "cross_gpu":
        from hvdet.nn import convert_cross_gpu_bn  # lazily: hvdet.nn needs a launched comm layer

        # From BatchNorm2d layers: each keeps its parameters and their requires_grad (frozen stages stay so).
        model = convert_cross_gpu_bn(model, group_size=bn_group_size, backend=bn_backend, stats=bn_stats,
                                     impl=bn_impl)
    return model

"""ResNet backbones: the fast variants' narrow FPN, torchvision's stage freezing, and a pretrained
ResNet state dict from a local file (weights are never downloaded)."""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from hvdet.models.design import FastDesign
from hvdet.registry import Arch


def fast_backbone(spec: Arch, d: FastDesign, norm_layer, trainable_layers: int, extra_blocks=None) -> BackboneWithFPN:
    """The fast variant's backbone: the ResNet body up to ``d.returned_layers`` under a narrow FPN."""
    body = resnet.__dict__[spec.backbone](weights=None, norm_layer=norm_layer)
    freeze_stages(body, trainable_layers)
    in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in d.returned_layers]  # torchvision's rule
    if extra_blocks is None:
        extra_blocks = LastLevelMaxPool() if d.pool_level else NoExtraLevel()
    return BackboneWithFPN(body, {f"layer{k}": str(i) for i, k in enumerate(d.returned_layers)},
                           in_channels, d.fpn_channels, extra_blocks=extra_blocks)


# Parameter names of torchvision's BackboneWithFPN, for the families' module maps (first match wins:
# the FPN sits inside the backbone).
BACKBONE_PREFIXES = (("backbone.fpn.", "fpn"), ("backbone.", "backbone"))


class NoExtraLevel(ExtraFPNBlock):
    """No pooled top level: the fast FPN ends at its last returned stage."""

    def forward(self, results, x, names):
        return results, names


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` ResNet stages, exactly as torchvision does."""
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(stage) for stage in train):
            param.requires_grad_(False)


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

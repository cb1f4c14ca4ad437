"""A detector family: the builder that makes its architectures, and its module map."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from hvdet.optim.build import ModuleMap


@dataclass(frozen=True)
class Family:
    """``build(spec, num_classes, norm_layer, trainable_layers, min_size, max_size, overrides,
    fast_design)`` returns the torchvision detector of :class:`hvdet.registry.Arch` ``spec`` with
    ``norm_layer`` in its backbone; ``modules`` names the detector's parts by parameter-name prefix
    (LargeDet's trust-ratio plots and AGVM's per-module groups: backbone, fpn, the heads). A new
    family (FCOS, a transformer backbone) is one of these and a line in
    :data:`hvdet.registry.FAMILIES`."""

    build: Callable[..., nn.Module]
    modules: ModuleMap

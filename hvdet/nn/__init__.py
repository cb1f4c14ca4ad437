"""Normalization layers for large mini-batch detection: MegDet's Cross-GPU BatchNorm."""
from hvdet.nn.cross_gpu_bn import (
    STATS,
    CrossGPUBatchNorm2d,
    bn_group_size,
    convert_cross_gpu_bn,
    group_moments,
)

__all__ = ["STATS", "CrossGPUBatchNorm2d", "bn_group_size", "convert_cross_gpu_bn",
           "group_moments"]

"""Normalization layers for large mini-batch detection: MegDet's Cross-GPU BatchNorm."""
from hvdet.nn.cross_gpu_bn import (
    STATS,
    CrossGPUBatchNorm2d,
    bn_group_size,
    convert_cross_gpu_bn,
    cross_gpu_batch_norm,
    group_moments,
)

__all__ = ["STATS", "CrossGPUBatchNorm2d", "bn_group_size", "convert_cross_gpu_bn", "cross_gpu_batch_norm",
           "group_moments"]

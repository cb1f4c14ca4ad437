"""Data: COCO-format, Pascal VOC and LVIS datasets, the synthetic shapes dataset, detection transforms,
distributed loaders."""
from hvdet.data.coco import CocoDetection, DataError, load_coco_json, skipped_boxes_line
from hvdet.data.loader import TrainLoader, build_eval_loader, collate_lists
from hvdet.data.lvis import LVISDetection
from hvdet.data.samplers import (
    EpochBatchSampler,
    epoch_permutation,
    eval_shard,
    group_batches,
    shard_indices,
)
from hvdet.data.transforms import DetectionTransforms, build_transforms
from hvdet.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "VOC_CLASSES",
    "CocoDetection",
    "DataError",
    "DetectionTransforms",
    "EpochBatchSampler",
    "LVISDetection",
    "TrainLoader",
    "VOCDetection",
    "build_eval_loader",
    "build_transforms",
    "collate_lists",
    "epoch_permutation",
    "eval_shard",
    "group_batches",
    "load_coco_json",
    "make_synthetic_coco",
    "shard_indices",
    "skipped_boxes_line",
]


def __getattr__(name):
    # Lazy, so that `python -m hvdet.data.synthetic` does not find its module already imported by
    # the package (runpy warns about that).
    if name == "make_synthetic_coco":
        from hvdet.data.synthetic import make_synthetic_coco
        return make_synthetic_coco
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""What hvdet needs of a detection dataset: the contract between a dataset format and the rest.

A format registered in :data:`hvdet.registry.DATASETS` (``data.format`` in a recipe) is a class
built as ``cls(image_dir, ann_file, transforms=..., with_masks=..., skip_invalid_boxes=...,
**data.format_args)`` whose instances satisfy :class:`DetectionDataset`.
:class:`hvdet.data.CocoDetection` is the reference implementation; the synthetic dataset is written
to disk in COCO's format and read by it; Pascal VOC (:class:`hvdet.data.VOCDetection`) and LVIS
(:class:`hvdet.data.LVISDetection`) subclass it, converting their files to a COCO dict in memory.

Who reads what:

* the train loader (:class:`hvdet.data.TrainLoader`): ``len()``, ``[index]``, ``aspect_ratios``
  (aspect-ratio grouping of batches);
* the model builder: ``num_classes``;
* evaluation (:mod:`hvdet.eval.coco`): ``ids`` (each image once over the shards), ``coco`` (the
  ground truth pycocotools scores against, and the original image sizes), ``contiguous_to_cat_id``
  (model labels back to the annotation file's category ids);
* the run builder (optional): ``skipped_boxes`` (what ``skip_invalid_boxes`` dropped) and ``ann_file``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DetectionDataset(Protocol):
    num_classes: int                    # object classes + 1 (torchvision's label 0 is the background)
    ids: list[int]                      # image ids, in the order of the indices
    aspect_ratios: list[float]          # width / height of each index's image
    contiguous_to_cat_id: dict[int, int]  # model label 1..num_classes-1 -> annotation category id
    coco: Any                           # a pycocotools.coco.COCO holding the ground truth

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        """(image tensor [3, H, W] float in [0, 1], target) with target keys ``boxes`` (float [N, 4]
        x0, y0, x1, y1 in pixels of the returned image), ``labels`` (int64 [N], 1..num_classes-1),
        ``image_id`` (int), optionally ``masks`` (uint8 [N, H, W])."""
        ...

"""COCO evaluation: distributed inference, detections gathered to rank 0, COCOeval there.

    metrics = evaluate(model, val_dataset, images_per_gpu=2, iou_types=("bbox", "segm"), scorer="auto")
    metrics["bbox"]["AP"]   # AP@[.5:.95]; also AP50 (the Open Images-style metric), AP75, APs, APm, APl

Each rank infers its own shard of the val set (``build_eval_loader``: every image on exactly one
rank), so the merged detections are the single-process detections and the metrics are equal.
Values are floats in [0, 1], or -1 where COCOeval leaves one undefined (e.g. APl when the set has no
large objects). COCOeval is pycocotools' or faster-coco-eval's (``scorer``, :mod:`hvdet.scoring`):
the same metrics.
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

from hvdet import comm
from hvdet.data.loader import build_eval_loader
from hvdet.scoring import cocoeval_stats

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in this order
IOU_TYPES = {"bbox": "bbox", "segm": "segmentation"}  # iou type -> the detection key it scores
MASK_THRESHOLD = 0.5


def evaluate(model, dataset, *, images_per_gpu: int = 2, num_workers: int = 0, iou_types=("bbox",),
             progress: bool = True, heartbeat=None, scorer: str = "auto") -> dict:
    """COCO metrics of ``model`` on ``dataset`` (a :class:`hvdet.data.CocoDetection`), on every rank.

    Collective: every rank must call it. The model is put in eval mode and restored afterwards.
    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` for each of ``iou_types``;
    rank 0 scores with ``scorer`` (:func:`hvdet.scoring.resolve`).
    """
    iou_types = tuple(iou_types)
    unknown = set(iou_types) - set(IOU_TYPES)
    if unknown:
        raise ValueError(f"iou_types must be among {sorted(IOU_TYPES)}, got {sorted(unknown)}")
    _check_segm_ground_truth(dataset.coco, iou_types)  # on every rank, before any collective
    failure = None
    try:
        image_ids, detections = detect_shard(model, dataset, comm.rank(), comm.size(), images_per_gpu=images_per_gpu,
                                             num_workers=num_workers, with_masks="segm" in iou_types,
                                             progress=progress, heartbeat=heartbeat)
    except Exception as err:  # noqa: BLE001 -- any failure still joins the gather below, so the
        # other ranks fail too instead of waiting in it forever; it is re-raised right after.
        image_ids, detections, failure = [], [], err
    # Synchronization point: rank 0 alone receives every rank's detections (COCOeval is single-process
    # and slow) and a failure message from any rank that failed.
    gathered = comm.gather_object((image_ids, detections, failure and f"{type(failure).__name__}: {failure}"))
    metrics, error = None, None
    if comm.is_main_process():
        try:
            metrics = score(dataset, gathered, iou_types, scorer)
        except Exception as err:  # noqa: BLE001 -- the others wait in the broadcast: tell them
            error = str(err)
    # ...and every rank returns them, so any rank can decide "target reached, stop".
    metrics, error = comm.broadcast_object((metrics, error), root_rank=0)
    if failure is not None:
        raise failure  # this rank's own error, with its traceback
    if error:
        raise RuntimeError(error)
    return metrics


def detect_shard(model, dataset, rank: int, world_size: int, *, images_per_gpu: int = 2, num_workers: int = 0,
                 with_masks: bool = False, progress: bool = False, heartbeat=None) -> tuple[list[int], list[dict]]:
    """``rank``'s shard of ``dataset``: its image ids and COCO detections (no collective; the model is
    put in eval mode and restored). Background evaluation (hvdet.eval.background) runs this alone.

    The random number generators are left as they were found: a DataLoader draws its base seed from
    torch's global RNG, which training's RoI sampling also draws from, so an evaluation would
    otherwise change every later training step, and synchronous and background evaluation (which
    draws in another process) would train different models."""
    loader = build_eval_loader(dataset, images_per_gpu, rank, world_size, num_workers)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _infer(model, loader, dataset, with_masks, progress, heartbeat)
    finally:
        model.train(was_training)


def score(dataset, gathered: list[tuple], iou_types, scorer: str = "auto") -> dict:
    """COCO metrics of every rank's ``(image_ids, detections, error message or None)``; raises
    RuntimeError naming the ranks that failed, or the scoring's own failure."""
    errors = [f"rank {r}: {message}" for r, (_, _, message) in enumerate(gathered) if message]
    if errors:
        raise RuntimeError("evaluation failed on another rank; " + "; ".join(errors))
    try:
        _check_coverage([i for ids, _, _ in gathered for i in ids], dataset)
        merged = [d for _, dets, _ in gathered for d in dets]
        return {iou_type: coco_eval(dataset.coco, merged, iou_type, scorer) for iou_type in iou_types}
    except Exception as err:
        raise RuntimeError(f"scoring the detections on rank 0 failed: {type(err).__name__}: {err}") from err


def _check_segm_ground_truth(coco_gt: COCO, iou_types) -> None:
    if "segm" in iou_types and any("segmentation" not in a for a in coco_gt.anns.values()):
        raise ValueError("segm evaluation needs a segmentation in every ground-truth annotation; "
                         "this annotation file has boxes only")


def coco_eval(coco_gt: COCO, detections: list[dict], iou_type: str = "bbox", scorer: str = "auto") -> dict:
    """COCOeval of ``detections`` (COCO result dicts) against ``coco_gt`` by ``scorer``; one process.

    Each detection has ``image_id``, ``category_id``, ``score`` and ``bbox`` (xywh) and/or
    ``segmentation`` (RLE); only the key of ``iou_type`` is passed on, so segm results are filtered
    by mask area as COCO defines it, not by box area.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {sorted(IOU_TYPES)}, got {iou_type!r}")
    key = IOU_TYPES[iou_type]
    _check_segm_ground_truth(coco_gt, (iou_type,))
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], key: d[key], "score": d["score"]}
               for d in detections]
    stats = cocoeval_stats(coco_gt, results, iou_type, scorer)
    return dict(zip(METRICS, stats, strict=False))


def to_coco_detections(output: dict, image_id: int, contiguous_to_cat_id: dict, with_masks: bool = False) -> list[dict]:
    """One image's torchvision detector output (boxes xyxy, labels, scores[, masks]) as COCO results."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].tolist()
    detections = [{"image_id": image_id, "category_id": contiguous_to_cat_id[label], "bbox": box, "score": score}
                  for box, label, score in zip(xywh, labels, scores, strict=True)]
    if with_masks:
        if "masks" not in output:
            raise ValueError("the model's output has no 'masks': segm evaluation needs a Mask R-CNN")
        for det, rle in zip(detections, _encode_masks(output["masks"]), strict=True):
            det["segmentation"] = rle
    return detections


def _infer(model, loader, dataset, with_masks: bool, progress: bool, heartbeat=None) -> tuple[list[int], list[dict]]:
    """This rank's image ids and detections; ``heartbeat(where)`` after every batch (the watchdog's)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    image_ids, detections = [], []
    bar = tqdm(loader, desc="eval", unit="batch", disable=not (progress and comm.is_main_process()))
    with torch.inference_mode():
        for images, targets in bar:
            batch_ids = [int(t["image_id"]) for t in targets]
            if heartbeat is not None:
                heartbeat(f"evaluating images {batch_ids}")
            for image, image_id in zip(images, batch_ids, strict=True):
                _check_original_size(image, dataset.coco.imgs[image_id])
            outputs = model([image.to(device) for image in images])
            for image_id, output in zip(batch_ids, outputs, strict=True):
                detections += to_coco_detections(output, image_id, dataset.contiguous_to_cat_id, with_masks)
            image_ids += batch_ids
    return image_ids, detections


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """Mask R-CNN's [N,1,H,W] probabilities -> RLEs of the masks thresholded at 0.5
    (str counts: picklable, JSON-able)."""
    if len(masks) == 0:
        return []
    binary = (masks[:, 0] > MASK_THRESHOLD).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _check_original_size(image: torch.Tensor, info: dict) -> None:
    # The model maps its boxes back to the size of the image it was given; COCO's ground truth is
    # in the original size, so the eval transform must not resize (build_transforms(train=False)).
    if tuple(image.shape[-2:]) != (info["height"], info["width"]):
        raise ValueError(f"image {info['file_name']} reached the model at {tuple(image.shape[-2:])} (HxW), not its "
                         f"original {info['height']}x{info['width']}: evaluate with build_transforms(train=False), "
                         "which leaves resizing to the model")


def _check_coverage(image_ids: list[int], dataset) -> None:
    if sorted(image_ids) != sorted(dataset.ids):
        raise RuntimeError(f"evaluation covered {len(image_ids)} images ({len(set(image_ids))} distinct) of "
                           f"{len(dataset.ids)}: the shards must hold every image exactly once")


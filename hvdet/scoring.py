"""COCOeval scoring by pycocotools or by faster-coco-eval: one switch (``eval.scorer``), the same stats.

    stats = cocoeval_stats(coco_gt, results, "bbox", scorer="auto")   # COCOeval.stats: 12 floats

``pycocotools`` is the reference. ``faster_coco_eval`` (PyPI faster-coco-eval, pinned in setup.py) is
a C++ port of COCOeval's evaluate and accumulate: 4.9x faster for boxes and 2.1x for masks on 5000
images (benchmarks/scoring_speed.py, docs/training.md). Its 12 stats equal pycocotools' for boxes and
masks, crowd regions and score ties included, to the last bit or within a few 1e-17: it rounds some
precisions differently in the last bit (tests/test_scoring.py holds the two to 1e-12). ``auto`` (the
default) is faster-coco-eval where it imports, else pycocotools. The scorer a run used is in each of
its eval records.

Torch-free and light: the scoring packages are imported on first use (hvdet.config_checks imports
this module for the allowed names).
"""
from __future__ import annotations

import contextlib
import io
import weakref

SCORERS = ("pycocotools", "faster_coco_eval")
CHOICES = ("auto", *SCORERS)
NUM_STATS = 12  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl: COCOeval.stats, both scorers

# pycocotools COCO -> (the dataset dict it was made from, faster-coco-eval's COCO of a copy of it)
_FASTER_GT = weakref.WeakKeyDictionary()


def resolve(scorer: str) -> str:
    """The scorer that ``scorer`` names: ``auto`` is faster_coco_eval where it imports, else pycocotools.
    Raises ValueError for an unknown name, ImportError for faster_coco_eval where it does not import."""
    if scorer not in CHOICES:
        raise ValueError(f"eval.scorer must be one of {', '.join(CHOICES)}, got {scorer!r}")
    if scorer == "pycocotools":
        return scorer
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as err:
        if scorer == "auto":
            return "pycocotools"
        raise ImportError(f"eval.scorer=faster_coco_eval, but faster_coco_eval does not import ({err}); "
                          "pip install faster-coco-eval==1.8.0, or set eval.scorer=auto") from None
    return "faster_coco_eval"


def cocoeval_stats(coco_gt, results: list[dict], iou_type: str, scorer: str = "auto") -> list[float]:
    """COCOeval.stats of ``results`` (COCO result dicts; loadRes adds keys to them) against ``coco_gt``
    (a pycocotools COCO), by ``scorer`` (see :func:`resolve`). One process."""
    scorer = resolve(scorer)
    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and pycocotools its table
        stats = (_pycocotools_stats if scorer == "pycocotools" else _faster_stats)(coco_gt, results, iou_type)
    if len(stats) != NUM_STATS:
        raise RuntimeError(f"{scorer} returned {len(stats)} stats for {iou_type}, not COCOeval's {NUM_STATS}")
    return [float(s) for s in stats]


def _pycocotools_stats(coco_gt, results: list[dict], iou_type: str):
    from pycocotools.cocoeval import COCOeval

    coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _faster_stats(coco_gt, results: list[dict], iou_type: str):
    from faster_coco_eval import COCOeval_faster

    gt = _faster_ground_truth(coco_gt)
    # One thread, as pycocotools (its default is up to 8 for mask IoUs): a background evaluator scores
    # beside a training rank that has the cores.
    evaluator = COCOeval_faster(gt, gt.loadRes(results), iou_type, print_function=_quiet, rle_iou_max_workers=1)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _faster_ground_truth(coco_gt):
    """faster-coco-eval's COCO of ``coco_gt``'s dataset, made once per ground truth (training scores the
    same val set many times). A deep copy: faster-coco-eval adds keys (the RLEs of the masks) to the
    annotations it scores, and they stay pycocotools' and the training set's own."""
    from faster_coco_eval import COCO

    cached = _FASTER_GT.get(coco_gt)
    if cached is None or cached[0] is not coco_gt.dataset:  # a new dataset dict: made again
        cached = (coco_gt.dataset, COCO(coco_gt.dataset, use_deepcopy=True, print_function=_quiet))
        _FASTER_GT[coco_gt] = cached
    return cached[1]


def _empty_results(coco_gt):
    """No detections at all (an untrained model): an empty result set, which COCOeval scores as 0.
    (pycocotools' loadRes refuses an empty list; faster-coco-eval's takes it.)"""
    from pycocotools.coco import COCO

    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                       "categories": list(coco_gt.dataset["categories"])}
    coco_dt.createIndex()
    return coco_dt


def _quiet(*args, **kwargs) -> None:
    """faster-coco-eval's print_function: its progress and table go nowhere, as pycocotools' stdout."""

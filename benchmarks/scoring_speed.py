"""COCOeval scoring time, pycocotools against faster-coco-eval (eval.scorer), boxes and masks.

    .venv/bin/python benchmarks/scoring_speed.py [--repeats 5] [--data /tmp/hvdet_scoring_speed]

What rank 0 does at every evaluation while the other ranks wait: :func:`hvdet.scoring.cocoeval_stats`
(loadRes, evaluate, accumulate, summarize; one thread each) on two val sets, written under ``--data``
once (not data/): ``demo`` (the demo's: ``python -m hvdet.data.synthetic`` with its defaults, 128
images of 128 px, polygons) and ``hard5k`` (the study's hard preset at 64 px, 5000 images, RLEs).
Detections are derived from the ground truth (jittered boxes, shifted masks, duplicates, missed
objects, false positives, scores rounded to 0.1), 20 per image. The two scorers alternate, the one
going first alternating too, ``--repeats`` times; medians and their ratio. faster-coco-eval's copy of
the ground truth is made once per val set (training scores the same set every time) and is timed
apart (``faster_gt_copy_s``). The stats of the two are compared (``max_abs_stat_diff``).
Results: benchmarks/results/scoring_speed.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT, provenance
from hvdet import scoring
from hvdet.data import make_synthetic_coco
from hvdet.eval.coco import IOU_TYPES

SETS = {  # name -> make_synthetic_coco's arguments
    "demo": {"num_val": 128, "image_size": 128, "preset": "shapes"},
    "hard5k": {"num_val": 5000, "image_size": 64, "preset": "hard"},
}
DETECTIONS_PER_IMAGE = 20


def val_set(data_dir: Path, name: str) -> COCO:
    out = data_dir / name
    ann = out / "annotations" / "instances_val.json"
    if not ann.exists():
        start = time.perf_counter()
        make_synthetic_coco(out, num_train=0, seed=0, **SETS[name])
        print(f"wrote {name} to {out} in {time.perf_counter() - start:.0f} s", flush=True)
    coco = COCO()
    coco.dataset = json.loads(ann.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections(coco: COCO, per_image: int, seed: int = 0) -> list[dict]:
    """``per_image`` detections an image: its objects' (85% found, jittered, 20% duplicated), then false positives."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(coco.cats)
    out = []
    for image_id, info in coco.imgs.items():
        h, w = info["height"], info["width"]
        found = []
        for ann in coco.imgToAnns[image_id]:
            if rng.random() < 0.15:
                continue
            mask = np.roll(coco.annToMask(ann), int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
            found += [(ann["category_id"], mask, 0.3 + 0.7 * rng.random())]
            if rng.random() < 0.2:
                found += [(ann["category_id"], mask, 0.5 * rng.random())]
        while len(found) < per_image:
            x, y = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y:y + int(rng.integers(2, h - y + 1)), x:x + int(rng.integers(2, w - x + 1))] = 1
            found += [(int(rng.choice(cat_ids)), mask, 0.6 * rng.random())]
        for category_id, mask, score in found[:per_image]:
            rle = mask_utils.encode(np.asfortranarray(mask))
            x0, y0, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            rle["counts"] = rle["counts"].decode("ascii")
            box = [x0 + rng.normal(0, 1), y0 + rng.normal(0, 1), bw * rng.uniform(0.9, 1.1), bh * rng.uniform(0.9, 1.1)]
            out.append({"image_id": image_id, "category_id": category_id, "bbox": box, "segmentation": rle,
                        "score": round(float(score), 1)})
    return out


def time_scoring(coco: COCO, dets: list[dict], iou_type: str, repeats: int) -> dict:
    key = IOU_TYPES[iou_type]
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], key: d[key], "score": d["score"]}
               for d in dets]
    scoring._FASTER_GT.pop(coco, None)  # the one-time copy, timed by itself
    start = time.perf_counter()
    scoring._faster_ground_truth(coco)
    gt_copy_s = time.perf_counter() - start
    seconds = {s: [] for s in scoring.SCORERS}
    stats = {}
    for r in range(repeats):
        for scorer in (scoring.SCORERS if r % 2 == 0 else scoring.SCORERS[::-1]):
            fresh = copy.deepcopy(results)  # loadRes adds keys to its results
            start = time.perf_counter()
            stats[scorer] = scoring.cocoeval_stats(coco, fresh, iou_type, scorer)
            seconds[scorer].append(time.perf_counter() - start)
        print(f"  {iou_type} repeat {r + 1}/{repeats}: " + ", ".join(f"{s} {v[-1]:.2f} s" for s, v in seconds.items()),
              flush=True)
    median = {s: statistics.median(v) for s, v in seconds.items()}
    return {"detections": len(results), "seconds": seconds, "median_s": median,
            "speedup": median["pycocotools"] / median["faster_coco_eval"], "faster_gt_copy_s": gt_copy_s,
            "max_abs_stat_diff": max(abs(a - b) for a, b in zip(*stats.values(), strict=True)),
            "AP": stats["pycocotools"][0]}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "uptime": uptime}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--data", default="/tmp/hvdet_scoring_speed", help="where the val sets are written (once)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/scoring_speed.json"))
    args = p.parse_args()
    result = {"command": "python benchmarks/scoring_speed.py " + " ".join(sys.argv[1:]), "repeats": args.repeats,
              "detections_per_image": DETECTIONS_PER_IMAGE, "versions": {
                  s: importlib.metadata.version(s.replace("_", "-")) for s in scoring.SCORERS},
              "machine_before": machine(), "sets": {}}
    for name in args.sets:
        coco = val_set(Path(args.data), name)
        dets = detections(coco, DETECTIONS_PER_IMAGE)
        print(f"{name}: {len(coco.imgs)} images, {len(coco.anns)} objects, {len(dets)} detections", flush=True)
        result["sets"][name] = {"images": len(coco.imgs), "objects": len(coco.anns), **SETS[name],
                                **{t: time_scoring(coco, dets, t, args.repeats) for t in IOU_TYPES}}
    result["machine_after"] = machine()
    result["provenance"] = provenance()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'set':8} {'iou':5} {'dets':>7} {'pycocotools':>12} {'faster':>9} {'ratio':>6} "
          f"{'gt copy':>8} {'max diff':>9}")
    for name, s in result["sets"].items():
        for t in IOU_TYPES:
            r = s[t]
            print(f"{name:8} {t:5} {r['detections']:7d} {r['median_s']['pycocotools']:11.3f}s "
                  f"{r['median_s']['faster_coco_eval']:8.3f}s {r['speedup']:5.2f}x {r['faster_gt_copy_s']:7.3f}s "
                  f"{r['max_abs_stat_diff']:9.1e}")
    print(f"load: {result['machine_before']['uptime']} -> {result['machine_after']['uptime']}; wrote {args.out}")


if __name__ == "__main__":
    main()

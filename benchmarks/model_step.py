"""Forward + backward time of one training step: torchvision's defaults vs hvdet's fast CPU variant.

    .venv/bin/python benchmarks/model_step.py                       # all variants, JSON to benchmarks/results/
    .venv/bin/python benchmarks/model_step.py --variants fast --profile fast

One step = the detector's training forward on ``--images`` images of ``--size`` px with their targets,
then ``backward()`` of the summed losses (no optimizer step, no allreduce). One thread, as each of
the 2 ranks of the CPU demo gets. Variants run interleaved (A B C A B C ...) so that load from other
processes on a shared machine hits them all alike; the medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import provenance
from hvdet.models import FAST, build_detector

NUM_CLASSES = 4  # 3 shape classes + background, as the synthetic dataset


def torchvision_r18(**kwargs):
    """torchvision's Faster R-CNN recipe on a ResNet-18-FPN (frozen BN), inputs kept at 128 px."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    kwargs.setdefault("num_classes", None if "box_predictor" in kwargs else NUM_CLASSES)
    return FasterRCNN(backbone, min_size=128, max_size=128, **kwargs)


def issue_tuned():
    """The issue's second measurement: 64 RoIs per image, 150 proposals, 256-wide box head."""
    return torchvision_r18(rpn_post_nms_top_n_train=150, box_batch_size_per_image=64,
                           box_head=TwoMLPHead(256 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, NUM_CLASSES))


def fast(**kwargs):
    return build_detector("fasterrcnn_resnet18_fpn_fast", NUM_CLASSES, **kwargs)


VARIANTS = {
    "torchvision_default": torchvision_r18,
    "issue_tuned": issue_tuned,
    "fast": fast,
    "fast_local_bn": lambda: fast(norm="local"),
    "maskrcnn_fast_local_bn": lambda: build_detector("maskrcnn_resnet18_fpn_fast", NUM_CLASSES, norm="local"),
    # Ablations: the fast variant with one choice put back to torchvision's value.
    "fast+roi7x7": lambda: fast(fast_design=replace(FAST, roi_output_size=7)),
    "fast+fpn256": lambda: fast(fast_design=replace(FAST, fpn_channels=256)),
    "fast+head1024": lambda: fast(fast_design=replace(FAST, representation_size=1024)),
    "fast+P2-P6": lambda: fast(fast_design=replace(FAST, returned_layers=(1, 2, 3, 4), pool_level=True,
                                                   anchor_sizes=((16,), (32,), (64,), (128,), (256,)))),
    "fast+512rois": lambda: fast(box_batch_size_per_image=512, rpn_post_nms_top_n_train=2000,
                                 rpn_pre_nms_top_n_train=2000),
}


def make_batch(images: int, size_px: int, seed: int = 0):
    """Random images with 1-4 boxes each, sides 15-50% of the image (the synthetic dataset's range)."""
    g = torch.Generator().manual_seed(seed)
    batch, targets = [], []
    for _ in range(images):
        n = int(torch.randint(1, 5, (1,), generator=g))
        side = torch.empty(n, 2).uniform_(0.15 * size_px, 0.5 * size_px, generator=g)
        xy0 = torch.rand(n, 2, generator=g) * (size_px - side)
        boxes = torch.cat([xy0, xy0 + side], dim=1)
        masks = torch.zeros(n, size_px, size_px, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, NUM_CLASSES, (n,), generator=g)
        batch.append(torch.rand(3, size_px, size_px, generator=g))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return batch, targets


def step_s(model, images, targets) -> float:
    start = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    elapsed_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed_s


def profile(model, images, targets, top: int = 12) -> str:
    step_s(model, images, targets)  # warm-up outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_s(model, images, targets)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", choices=list(VARIANTS), help="print the top ops of one step of this variant")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_step.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images, targets = make_batch(args.images, args.size)
    torch.manual_seed(0)
    models = {name: VARIANTS[name]().train() for name in args.variants}
    if args.profile:
        print(profile(models.get(args.profile) or VARIANTS[args.profile]().train(), images, targets))
    samples = {name: [] for name in models}
    for model in models.values():
        step_s(model, images, targets)  # warm-up: allocator, first-call dispatch
    for rep in range(args.repeats):
        for name, model in models.items():
            samples[name].append(step_s(model, images, targets))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.3f}s" for n, s in samples.items()),
              flush=True)

    base = statistics.median(samples["torchvision_default"]) if "torchvision_default" in samples else None
    results = {}
    for name, s in samples.items():
        median_s = statistics.median(s)
        results[name] = {"median_s": round(median_s, 4), "min_s": round(min(s), 4),
                         "samples_s": [round(x, 4) for x in s],
                         "speedup_vs_default": round(base / median_s, 2) if base else None,
                         "parameters": sum(p.numel() for p in models[name].parameters())}
    report = {"benchmark": "detector forward+backward per training step", "images": args.images,
              "size_px": args.size, "threads": args.threads, "repeats": args.repeats,
              "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM, no GPU (shared)",
              "provenance": provenance(), "torch": torch.__version__, "results": results}
    print(f"{'variant':<24}{'median s/step':>14}{'min':>8}{'vs default':>12}")
    for name, r in results.items():
        print(f"{name:<24}{r['median_s']:>14.3f}{r['min_s']:>8.3f}{r['speedup_vs_default'] or float('nan'):>11.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

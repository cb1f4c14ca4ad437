"""``hvdet project`` (= ``python -m hvdet.timemodel``): predicted step, scaling efficiency and time to
train on 8 ... 1024 GPUs of the named systems; ``--validate`` against published runs; ``--calibrate``
a 1-rank measurement against an N-rank one on this machine.

    hvdet project                                         # Faster R-CNN R50-FPN, CGBN 32, V100's step
    hvdet project --metrics runs/x --system dgx-h100      # compute from a run (its phases, ranks, arch)
    hvdet project --step-s 0.12 --model maskrcnn_resnet50_fpn --norm frozen --inter-gbs 100
    hvdet project --validate                              # the markdown table of docs/scaling.md
    hvdet project --calibrate one_rank.json two_ranks.json --system cpu-vm
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from hvdet.timemodel import measured
from hvdet.timemodel.model import ALGORITHMS, Horovod, Link, System, Workload, from_measured_step, step
from hvdet.timemodel.model import time_to_train_s as _time
from hvdet.timemodel.presets import (
    BN_COLLECTIVES,
    CPU_HOROVOD,
    DEFAULT_IMAGES,
    GPU_SYSTEMS,
    HVDET_HOROVOD,
    MODELS,
    REFERENCE_SOURCE,
    REFERENCE_STEPS,
    SYSTEMS,
)
from hvdet.timemodel.validation import CASES, fmt_value, predict, table

GPUS = tuple(8 * 2**k for k in range(8))  # 8 ... 1024


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Predict step time, scaling efficiency and time to "
                                "train on N GPUs (hvdet.timemodel; docs/scaling.md).")
    p.add_argument("--system", help=f"comma-separated, of {', '.join(SYSTEMS)} (default: the three DGX; "
                   "with --calibrate: cpu-vm)")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} (default: the run's arch, else "
                   "fasterrcnn_resnet50_fpn; with --calibrate: fasterrcnn_resnet18_fpn_fast, the demo's)")
    p.add_argument("--params", type=float, help="parameter count (overrides the model's)")
    p.add_argument("--bytes-per-grad", type=int, default=4, help="4 (fp32) or 2 (fp16/bf16 allreduce)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--metrics", help="the measured step: a run dir, metrics.jsonl, or JSON[#key.key]")
    src.add_argument("--step-s", type=float, help="the measured per-GPU step in seconds")
    p.add_argument("--measured-gpus", type=int, help="GPUs it was measured on (default: the run's, else 1)")
    p.add_argument("--measured-on", choices=tuple(SYSTEMS),
                   help="its system, as preset (default: each projected one; dgx-2 for the V100 reference)")
    p.add_argument("--images-per-gpu", type=int, help="default: the run's, else 2")
    p.add_argument("--backward-fraction", type=float, default=2 / 3,
                   help="backward's share of a step measured on more than one GPU (default 2/3)")
    p.add_argument("--norm", choices=("cross_gpu", "frozen", "local"), default="cross_gpu",
                   help="frozen or local (per-GPU) BN: no CGBN collectives")
    p.add_argument("--bn-size-images", type=int,
                   help="MegDet's BN size (default 32; with --calibrate: all ranks, as bn.size_images: null)")
    p.add_argument("--bn-stats", choices=("auto", *BN_COLLECTIVES), default="auto",
                   help="auto: chan on GPUs (2 collectives a layer), two_pass on cpu-vm (3)")
    p.add_argument("--fusion-mb", type=float, default=128.0, help="HOROVOD_FUSION_THRESHOLD in MiB")
    p.add_argument("--cycle-ms", type=float,
                   help="HOROVOD_CYCLE_TIME (default 5, as hvdet sets; 20 for a CPU host under horovodrun --gloo)")
    p.add_argument("--algorithm", choices=("best", *ALGORITHMS), default="best")
    p.add_argument("--images", type=float, default=DEFAULT_IMAGES,
                   help=f"training images to the target (default {DEFAULT_IMAGES:,}: 90k iterations x 16)")
    p.add_argument("--gpus", default=",".join(map(str, GPUS)), help="comma-separated GPU counts")
    for name, what in (("intra-gbs", "a GPU's link in a node, GB/s each way"),
                       ("inter-gbs", "a node's NICs together, GB/s each way"),
                       ("intra-latency-us", "per hop in a node"), ("inter-latency-us", "per hop between nodes")):
        p.add_argument(f"--{name}", type=float, help=f"override: {what}")
    p.add_argument("--gpus-per-node", type=int, help="override")
    p.add_argument("--validate", action="store_true", help="print the table against published runs")
    p.add_argument("--calibrate", nargs=2, metavar=("ONE_RANK", "N_RANKS"),
                   help="predict the N-rank step from the 1-rank one (runs or JSON) and print the error")
    return p


def _system(name: str, a) -> System:
    """The preset with the command line's overrides."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}: one of {', '.join(SYSTEMS)}")
    s = SYSTEMS[name]
    intra = Link(a.intra_gbs * 1e9 if a.intra_gbs else s.intra.bandwidth_Bps,
                 a.intra_latency_us * 1e-6 if a.intra_latency_us is not None else s.intra.latency_s)
    inter = Link(a.inter_gbs * 1e9 if a.inter_gbs else s.inter.bandwidth_Bps,
                 a.inter_latency_us * 1e-6 if a.inter_latency_us is not None else s.inter.latency_s)
    return replace(s, intra=intra, inter=inter, gpus_per_node=a.gpus_per_node or s.gpus_per_node)


def _horovod(system: System, a) -> Horovod:
    cycle = a.cycle_ms * 1e-3 if a.cycle_ms else (CPU_HOROVOD if system.name == "cpu-vm" else HVDET_HOROVOD).cycle_s
    return Horovod(fusion_bytes=a.fusion_mb * 2**20, cycle_s=cycle, algorithm=a.algorithm)


def _bn(system: System, a, model: str, images_per_gpu: int, bn_size_images: int | None = 32) -> dict:
    """CGBN's Workload fields: a group of ``bn_size_images / images_per_gpu`` GPUs (None: all)."""
    if a.norm != "cross_gpu":
        return {}
    size = a.bn_size_images or bn_size_images
    if size and size % images_per_gpu:
        raise ValueError(f"BN size {size} images is not a whole number of GPUs of {images_per_gpu} images")
    stats = a.bn_stats if a.bn_stats != "auto" else ("two_pass" if system.name == "cpu-vm" else "chan")
    return {"bn_layers": MODELS[model].bn_layers, "bn_collectives": BN_COLLECTIVES[stats],
            "bn_group": size // images_per_gpu if size else None}


def _reference(a) -> tuple[str, float, int, int, float | None, str]:
    """(model, step_s, gpus, images_per_gpu, backward_s or None, where the step comes from)."""
    if a.metrics:
        m = measured.load(a.metrics)
        model = a.model or (m.arch if m.arch in MODELS else None)
        if model is None and m.arch and a.params is None:
            raise ValueError(f"{a.metrics}: arch {m.arch!r} has no preset; give --model or --params")
        gpus = a.measured_gpus or m.world_size or 1
        return (model or "fasterrcnn_resnet50_fpn", m.step_s, gpus, a.images_per_gpu or m.images_per_gpu or 2,
                m.backward_s if gpus == 1 else None, f"measured, {m.source} ({gpus} GPU(s))")
    model = a.model or "fasterrcnn_resnet50_fpn"
    if a.step_s:
        return model, a.step_s, a.measured_gpus or 1, a.images_per_gpu or 2, None, "--step-s"
    if model not in REFERENCE_STEPS:
        raise ValueError(f"no reference step for {model}: give --step-s or --metrics")
    return model, REFERENCE_STEPS[model], 8, 2, None, REFERENCE_SOURCE


def _project(a) -> str:
    model, step_s, ref_gpus, ipg, backward, origin = _reference(a)
    params = a.params or MODELS[model].params
    out = []
    for name in (a.system or ",".join(GPU_SYSTEMS)).split(","):
        system = _system(name.strip(), a)
        horovod = _horovod(system, a)
        # where the step was measured: as preset; the V100 reference ran on a DGX-1, dgx-2 is the nearest
        on = SYSTEMS[a.measured_on or "dgx-2"] if a.measured_on or origin == REFERENCE_SOURCE else system
        bn = _bn(system, a, model, ipg)
        w = Workload(params, step_s, backward if backward is not None else a.backward_fraction * step_s, ipg,
                     a.bytes_per_grad, **bn)
        if backward is None:
            w = from_measured_step(w, step_s, ref_gpus, on, _horovod(on, a), a.backward_fraction)
        out += [f"## {system.name}: {system.source}",
                (f"intra {system.intra.bandwidth_Bps / 1e9:g} GB/s, {system.intra.latency_s * 1e6:g} us a hop; "
                 f"inter {system.inter.bandwidth_Bps / 1e9:g} GB/s per node, {system.inter.latency_s * 1e6:g} us a "
                 f"hop; {system.gpus_per_node} GPUs a node"),
                f"{model}: {params / 1e6:.2f}M params x {a.bytes_per_grad} B; {ipg} images/GPU; compute "
                f"{w.compute_s:.4g} s a step from {step_s:.4g} s ({origin}); "
                + (f"CGBN {w.bn_layers} layers x {w.bn_collectives} over {w.bn_group} GPUs" if bn else "no CGBN")
                + f"; fusion {a.fusion_mb:g} MiB, cycle {horovod.cycle_s * 1e3:g} ms, {a.algorithm} allreduce; "
                f"{a.images:,.0f} images", "",
                ("| GPUs | step (s) | CGBN (ms) | allreduces | allreduce (ms) | exposed (ms) | efficiency | "
                 "images/s | time to train |"), "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for n in (int(x) for x in a.gpus.split(",")):
            s = step(w, n, system, horovod)
            out.append(f"| {n} | {s.step_s:.4f} | {s.cgbn_s * 1e3:.1f} | {s.allreduce_ops:.1f} | "
                       f"{s.allreduce_s * 1e3:.1f} | {s.exposed_s * 1e3:.1f} | {100 * s.efficiency:.1f}% | "
                       f"{n * ipg / s.step_s:,.0f} | {fmt_value(_time(s, a.images, ipg), 'time')} |")
        out.append("")
    return "\n".join(out)


def _calibrate(a) -> str:
    one, many = (measured.load(x) for x in a.calibrate)
    model = a.model or (one.arch if one.arch in MODELS else None) or "fasterrcnn_resnet18_fpn_fast"
    system = _system(a.system or "cpu-vm", a)
    bn = _bn(system, a, model, one.images_per_gpu or 1, bn_size_images=None)
    c = measured.calibrate(one, many, system, _horovod(system, a), a.params or MODELS[model].params, **bn)
    return (f"calibration on {system.name}: {model}, {(a.params or MODELS[model].params) / 1e6:.2f}M params, "
            f"{'CGBN ' + str(bn['bn_layers']) + ' layers' if bn else 'no CGBN'}\n"
            f"1 rank: {one.step_s:.4f} s a step (measured, {one.source})\n"
            f"{c.ranks} ranks: predicted {c.predicted_s:.4f} s = compute {c.compute_s:.4f} + CGBN "
            f"{c.cgbn_s * 1e3:.1f} ms + exposed allreduce {c.exposed_s * 1e3:.1f} ms; measured {c.measured_s:.4f} s "
            f"({many.source}); error {100 * c.error:+.1f}%\n"
            f"measured - 1-rank step = {(c.measured_s - c.compute_s) * 1e3:.1f} ms: what communication and the ranks' "
            f"contention cost; the model accounts for {(c.predicted_s - c.compute_s) * 1e3:.1f} ms")


def main(argv: list[str] | None = None, prog: str = "hvdet project") -> int:
    a = _parser(prog).parse_args(argv)
    try:
        if a.validate:
            print("# Time model against published runs\n")
            print(table([predict(c) for c in CASES]))
        elif a.calibrate:
            print(_calibrate(a))
        else:
            print(_project(a))
    except (ValueError, KeyError, OSError) as err:
        print(f"hvdet project: {err}", file=sys.stderr)
        return 2
    return 0

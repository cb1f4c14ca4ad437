"""The one GPU check: ``pytest -m gpu``, then the GPU measurements, in a few minutes on one GPU.

    make gpu-check                                   # = .venv/bin/python benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py [--out FILE]     # any Python with torch, torchvision, triton

Without a CUDA device it says so and runs its CPU-safe parts (the same LAMB and CGBN code paths on
CPU tensors) as a smoke test. With one, it writes benchmarks/results/gpu_check.json and prints a
table. Measured, each variant interleaved with the others in rounds (medians of CUDA-event timings):

1. the PMD-LAMB step on the 41.8M parameters (189 tensors) of torchvision's fasterrcnn_resnet50_fpn:
   hvdet Triton (all tensors at once, and in L2-sized groups) vs hvdet's torch reference (foreach)
   vs timm ``Lamb`` vs torch ``AdamW(fused=True)``; with achieved bandwidth against a measured copy;
2. one BN layer (an FPN P2 map of 2 images at 800x1333: [2, 256, 200, 336]), forward + backward, fp32
   NCHW, fp32 channels-last and bf16 channels-last: cuDNN's training BatchNorm (the floor) vs
   torch.nn.SyncBatchNorm forced through its distributed path on an NCCL world of one vs CGBN's own
   arithmetic forced through the group path with a group of one rank (Triton kernels, and the torch
   reference);
3. a ResNet-50-FPN backbone step (forward + backward) with the same BN variants, fp32 NCHW and AMP
   bf16 channels-last;
4. the demo detector's (fasterrcnn_resnet18_fpn_fast, PMD-LAMB) training step with CGBN in fp32, AMP
   bf16 and AMP bf16 + channels-last, and with local BN (cuDNN) in fp32 and AMP bf16 + channels-last,
   in images/s; and fp32 and AMP bf16 + channels-last again with the backbone in CUDA graphs
   (solver.cuda_graphs, :mod:`hvdet.models.cuda_graphs`), CGBN and local BN; and CGBN fp32 with the
   backward on the calling thread instead of autograd's device thread;
5. the demo end to end (train.py, eval.mode sync and background);
6. Horovod's CUDA build under ``horovodrun -np 1`` (the backend its timeline names for CUDA tensors,
   ``pytest -m gpu`` and the demo under it), where Horovod is importable;
7. where a CGBN layer's host time goes (benchmarks/gpu_host.py): host microseconds per call of each of
   its pieces, the device operations per layer step, a cProfile of its forward;
8. the BN layer and the backbone step in CUDA graphs (torch.cuda.make_graphed_callables, and the whole
   step captured by torch.cuda.graph), eager vs graphed, each case in a child process (an illegal
   address in a capture aborts the process that made it; a dead child is triaged variant by variant).

One GPU cannot cover multi-rank NCCL collectives or AGVM (two ranks); the JSON says so.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_host import bench_host_overhead, kernel_breakdown, layer_step
from benchmarks.provenance import provenance
from hvdet import comm
from hvdet.nn import CrossGPUBatchNorm2d, convert_cross_gpu_bn
from hvdet.ops import lamb as ops_lamb
from hvdet.optim import PMDLAMB

LAMB_BYTES_PER_PARAM = 40   # stage 1 reads x g m v, writes m v; stage 2 reads x m v, writes x
ADAMW_BYTES_PER_PARAM = 28


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_variants(variants: dict, rounds: int = 5, reps: int = 10, warmup: int = 3) -> dict:
    """Median ms per call of each variant (CUDA events), and the host's ms to issue one call (when it
    is as long as the device's, the variant is bound by Python and launches, not by the GPU);
    variants run interleaved, the order rotating per round."""
    samples = {name: [] for name in variants}
    host = {name: [] for name in variants}
    names = list(variants)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            host[name].append((time.perf_counter() - t0) * 1e3 / reps)
            stop.record()
            stop.synchronize()
            samples[name].append(start.elapsed_time(stop) / reps)
    return {name: {"median_ms": statistics.median(s), "host_issue_ms": statistics.median(host[name]),
                   "samples_ms": s} for name, s in samples.items()}


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_variants({"copy": lambda: dst.copy_(src)}, rounds=3, reps=10)["copy"]["median_ms"]
    return 2 * nbytes / ms / 1e6  # read + write


# ---------------------------------------------------------------------------------------------
# 1. The optimizer step
# ---------------------------------------------------------------------------------------------

def r50_fpn_shapes() -> list[torch.Size]:
    import torchvision

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return [p.shape for p in model.parameters()]


def make_params(shapes, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, device="cuda", generator=gen) * 0.05)
        p.grad = torch.randn(shape, device="cuda", generator=gen) * 1e-3
        params.append(p)
    return params


def bench_lamb() -> dict:
    from timm.optim import Lamb

    shapes = r50_fpn_shapes()
    numel = sum(s.numel() for s in shapes)
    lr, wd = 1e-3, 5e-4
    opts = {
        "hvdet_triton": PMDLAMB(make_params(shapes), lr=lr, weight_decay=wd, impl="triton"),
        "hvdet_triton_l2_groups": PMDLAMB(make_params(shapes), lr=lr, weight_decay=wd, impl="triton"),
        "hvdet_triton_clip": PMDLAMB(make_params(shapes), lr=lr, weight_decay=wd, impl="triton", max_grad_norm=1.0),
        "hvdet_reference_foreach": PMDLAMB(make_params(shapes), lr=lr, weight_decay=wd, impl="reference"),
        # The same update as hvdet's default (no bias correction, no clipping); timm has no PMD decay.
        "timm_lamb": Lamb(make_params(shapes), lr=lr, weight_decay=wd, max_grad_norm=None, bias_correction=False),
        "timm_lamb_clip": Lamb(make_params(shapes), lr=lr, weight_decay=wd, bias_correction=False),
        "torch_adamw_fused": torch.optim.AdamW(make_params(shapes), lr=lr, weight_decay=wd, fused=True),
    }
    l2_group = 2 << 20  # 2M elements: x, g, m, v = 32 MB, half the H100/H200 L2

    def step(name):
        if name == "hvdet_triton_l2_groups":
            def run():
                saved, ops_lamb.TRITON_GROUP_ELEMS = ops_lamb.TRITON_GROUP_ELEMS, l2_group
                try:
                    opts[name].step()
                finally:
                    ops_lamb.TRITON_GROUP_ELEMS = saved
            return run
        return opts[name].step

    timings = time_variants({name: step(name) for name in opts}, rounds=5, reps=10)
    breakdown = {name: kernel_breakdown(opts[name].step) for name in ("hvdet_triton", "torch_adamw_fused")}
    ms = {k: v["median_ms"] for k, v in timings.items()}
    dev = {k: v["total_device_us"] for k, v in breakdown.items()}
    best_triton = min(ms["hvdet_triton"], ms["hvdet_triton_l2_groups"])
    return {"tensors": len(shapes), "params": numel, "timings": timings, "kernels": breakdown,
            "device_time_ratio hvdet_triton / torch_adamw_fused": dev["hvdet_triton"] / dev["torch_adamw_fused"]
            if all(dev.values()) else None,
            "achieved_gbs_device_time": {"hvdet_triton": LAMB_BYTES_PER_PARAM * numel / dev["hvdet_triton"] / 1e3,
                                         "torch_adamw_fused": ADAMW_BYTES_PER_PARAM * numel
                                         / dev["torch_adamw_fused"] / 1e3}
            if all(dev.values()) else None,
            "achieved_gbs": {"hvdet_triton": LAMB_BYTES_PER_PARAM * numel / ms["hvdet_triton"] / 1e6,
                             "torch_adamw_fused": ADAMW_BYTES_PER_PARAM * numel / ms["torch_adamw_fused"] / 1e6},
            "ratios": {"hvdet_triton_best / torch_adamw_fused": best_triton / ms["torch_adamw_fused"],
                       "timm_lamb / hvdet_triton_best": ms["timm_lamb"] / best_triton,
                       "timm_lamb_clip / hvdet_triton_clip": ms["timm_lamb_clip"] / ms["hvdet_triton_clip"],
                       "hvdet_reference_foreach / hvdet_triton_best": ms["hvdet_reference_foreach"] / best_triton},
            "goals": {"triton_within_1.3x_of_fused_adamw": best_triton / ms["torch_adamw_fused"] <= 1.3,
                      "triton_5x_faster_than_timm_lamb": ms["timm_lamb"] / best_triton >= 5.0}}


# ---------------------------------------------------------------------------------------------
# 2-3. Cross-GPU BN's arithmetic vs cuDNN BatchNorm
# ---------------------------------------------------------------------------------------------

def group_path(module: nn.Module) -> nn.Module:
    """Every CrossGPUBatchNorm2d in ``module`` runs CGBN's arithmetic with its group of one rank
    instead of the cuDNN shortcut (what this check measures on one GPU)."""
    for m in module.modules():
        if isinstance(m, CrossGPUBatchNorm2d):
            m.force_group_path = True
    return module


class ForcedSyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm through its distributed path on a process group of one: batch_norm_stats,
    an all-gather of (mean, invstd, count), batch_norm_gather_stats_with_counts, and in the backward
    batch_norm_backward_reduce, an allreduce, batch_norm_backward_elemt. Its own forward takes plain BN
    when the group has one rank, so this calls the autograd Function that forward would call with more
    (torch.nn.modules._functions.SyncBatchNorm, as of torch 2.x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFn

        self.num_batches_tracked.add_(1)
        group = self.process_group or torch.distributed.group.WORLD
        return SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                     self.momentum, group, 1)


@functools.cache  # one attempt: every variant after it asks again
def world_of_one() -> str | None:
    """A torch.distributed world of this one process (NCCL on the GPU), for SyncBatchNorm's collectives;
    the error, as a string, where one cannot be made (the SyncBatchNorm variants are then left out, and the
    JSON says why, instead of losing the measurements around them)."""
    import torch.distributed as dist

    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=torch.device("cuda", torch.cuda.current_device()))
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        return f"{type(err).__name__}: {err}"
    return None


def sync_bn(module: nn.Module) -> nn.Module:
    """``module`` with torch's SyncBatchNorm, forced through its distributed path, for every BatchNorm2d."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = ForcedSyncBatchNorm
    return module


def bn_variants(c: int):
    """name -> a fresh BN layer: cuDNN, torch's SyncBatchNorm (distributed path, group of one), and CGBN's
    group path with a group of one (Triton / reference)."""
    def cgbn(impl):
        def make():
            return group_path(CrossGPUBatchNorm2d(c, impl=impl))
        return make
    variants = {"cudnn_batchnorm": lambda: nn.BatchNorm2d(c), "torch_syncbn": lambda: sync_bn(nn.BatchNorm2d(c)),
                "cgbn_triton": cgbn("triton"), "cgbn_reference": cgbn("reference")}
    if world_of_one() is not None:
        del variants["torch_syncbn"]
    return variants


def ratios(ms: dict) -> dict:
    """Each variant's median time against cuDNN's, and CGBN's (Triton) against SyncBatchNorm's."""
    out = {f"{name} / cudnn": ms[name] / ms["cudnn_batchnorm"] for name in ms if name != "cudnn_batchnorm"}
    if "torch_syncbn" in ms:
        out["cgbn_triton / torch_syncbn"] = ms["cgbn_triton"] / ms["torch_syncbn"]
    else:
        out["torch_syncbn"] = f"left out: no torch.distributed world of one ({world_of_one()})"
    return out


def r50_fpn(bn: str) -> nn.Module:
    """torchvision's ResNet-50-FPN backbone (seeded, every layer trainable) on the GPU with ``bn``:
    cudnn_batchnorm, torch_syncbn (distributed path) or cgbn_<impl> (group path)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    net = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    if bn == "torch_syncbn":
        net = sync_bn(net)
    elif bn != "cudnn_batchnorm":
        net = group_path(convert_cross_gpu_bn(net, impl=bn.split("_")[1]))
    return net.cuda()


def feature_loss(feats: dict) -> torch.Tensor:
    """The backbone steps' loss: every FPN level's mean, in fp32."""
    return sum(f.float().mean() for f in feats.values())


def backbone_step(net: nn.Module, x: torch.Tensor, amp: bool = False):
    """One forward + backward of the backbone ``net`` on ``x`` (AMP bf16 when ``amp``), grads reset first."""
    def run():
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            feats = net(x)
        feature_loss(feats).backward()
    return run


def bench_bn_layer() -> dict:
    out = {}
    shape = (2, 256, 200, 336)
    # bf16 channels-last: what BN sees inside an AMP bf16 channels-last backbone (the conv's output;
    # autocast leaves batch_norm in its input's dtype), with fp32 parameters.
    for layout, fmt, dtype in (("nchw", torch.contiguous_format, torch.float32),
                               ("nhwc", torch.channels_last, torch.float32),
                               ("bf16_nhwc", torch.channels_last, torch.bfloat16)):
        x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=fmt)
        layers = {name: make().cuda() for name, make in bn_variants(shape[1]).items()}
        timings = time_variants({name: layer_step(layer, x, dy) for name, layer in layers.items()}, rounds=5, reps=10)
        ms = {k: v["median_ms"] for k, v in timings.items()}
        kernels = {name: kernel_breakdown(layer_step(layers[name], x, dy), top=8)
                   for name in ("cudnn_batchnorm", "torch_syncbn", "cgbn_triton") if name in layers}
        dev = {k: v["total_device_us"] for k, v in kernels.items()}
        out[layout] = {"shape": list(shape), "dtype": str(dtype), "timings": timings, "kernels": kernels,
                       "device_time_ratio cgbn_triton / cudnn": dev["cgbn_triton"] / dev["cudnn_batchnorm"]
                       if all(dev.values()) else None, **ratios(ms)}
    return out


def bench_backbone() -> dict:
    out = {}
    images = torch.randn(8, 3, 512, 512, device="cuda")
    for setting, amp, fmt in (("fp32_nchw", False, torch.contiguous_format), ("bf16_nhwc", True, torch.channels_last)):
        x = images.to(memory_format=fmt)
        variants = {}
        for name in ("cudnn_batchnorm", "torch_syncbn", "cgbn_triton", "cgbn_reference"):
            if name == "torch_syncbn" and world_of_one() is not None:
                continue
            variants[name] = backbone_step(r50_fpn(name).to(memory_format=fmt), x, amp)
        timings = time_variants(variants, rounds=3, reps=5)
        ms = {k: v["median_ms"] for k, v in timings.items()}
        out[setting] = {"images": list(images.shape), "timings": timings, **ratios(ms)}
    return out


# ---------------------------------------------------------------------------------------------
# 4. The demo detector's training step
# ---------------------------------------------------------------------------------------------

def bench_detector(images_per_gpu: int = 16, size: int = 512) -> dict:
    from hvdet.models import build_detector
    from hvdet.models.cuda_graphs import graph_backbone
    from hvdet.step import autocast

    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=gen).cuda() for _ in range(images_per_gpu)]
    targets = []
    for _ in images:
        xy = torch.rand(4, 2, generator=gen) * (size * 0.6)
        wh = 16 + torch.rand(4, 2, generator=gen) * (size * 0.3)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).cuda(), "labels": torch.randint(1, 5, (4,)).cuda()})
    variants = {}
    # CGBN (a group of one, forced through its arithmetic) in three precisions/layouts; local BN (cuDNN) in
    # two of them: what turning Cross-GPU BN on costs the whole step; and with the backbone in CUDA graphs
    # (solver.cuda_graphs), what is left of that cost without the host's launches.
    for name, amp, fmt, norm in (("fp32", False, torch.contiguous_format, "cross_gpu"),
                                 ("amp_bf16", True, torch.contiguous_format, "cross_gpu"),
                                 ("amp_bf16_channels_last", True, torch.channels_last, "cross_gpu"),
                                 ("fp32 local_bn", False, torch.contiguous_format, "local"),
                                 ("amp_bf16_channels_last local_bn", True, torch.channels_last, "local"),
                                 ("fp32 cuda_graphs", False, torch.contiguous_format, "cross_gpu"),
                                 ("amp_bf16_channels_last cuda_graphs", True, torch.channels_last, "cross_gpu"),
                                 ("fp32 local_bn cuda_graphs", False, torch.contiguous_format, "local"),
                                 ("amp_bf16_channels_last local_bn cuda_graphs", True, torch.channels_last,
                                  "local"),
                                 # autograd's device thread made a CGBN layer's backward 5x its body on the
                                 # H200's host (host_overhead): does running it on the calling thread pay?
                                 ("fp32 backward on the calling thread", False, torch.contiguous_format,
                                  "cross_gpu")):
        torch.manual_seed(0)
        model = group_path(build_detector("fasterrcnn_resnet18_fpn_fast", 6, norm=norm, min_size=size,
                                          max_size=size))
        model = model.cuda().to(memory_format=fmt).train()
        graphs = name.endswith("cuda_graphs")
        threads = not name.endswith("calling thread")
        if graphs:
            graph_backbone(model)
        opt = PMDLAMB(model.parameters(), lr=0.02, max_grad_norm=10.0)

        def run(model=model, opt=opt, amp=amp, graphs=graphs, threads=threads):
            opt.zero_grad()
            with autocast(torch.device("cuda"), torch.bfloat16 if amp else None, graphs):
                losses = model(images, targets)
            with torch.autograd.set_multithreading_enabled(threads):
                sum(losses.values()).backward()
            opt.step()
        variants[name] = run
    timings = time_variants(variants, rounds=3, reps=5)
    return {"arch": "fasterrcnn_resnet18_fpn_fast", "norm": "cross_gpu (group of one, forced); local: BatchNorm2d",
            "optimizer": "pmdlamb (triton)", "images_per_gpu": images_per_gpu, "image_px": size,
            "timings": timings,
            "images_per_s": {k: images_per_gpu / (v["median_ms"] / 1e3) for k, v in timings.items()}}


# ---------------------------------------------------------------------------------------------
# 5. The demo end to end: train.py on this GPU, synchronous against background evaluation
# ---------------------------------------------------------------------------------------------

@functools.cache  # bench_demo and bench_horovod train on the same data: written once
def demo_data() -> Path:
    """A scratch folder with the demo's synthetic dataset written under data/."""
    from hvdet.data.synthetic import make_synthetic_coco

    tmp = Path(tempfile.mkdtemp(prefix="hvdet-gpu-demo-"))
    make_synthetic_coco(tmp / "data", num_train=1024, num_val=128, image_size=128, seed=0)
    return tmp


def train_demo(tmp: Path, name: str, *overrides: str, launcher: tuple[str, ...] = (), timeout_s: float = 240) -> dict:
    """``train.py`` with the demo recipe on the data in ``tmp`` (under ``launcher``, if any): its
    time to target, AP per evaluation and wall time."""
    from benchmarks.eval_modes import demo_result

    out = tmp / name
    cmd = [*launcher, sys.executable, "train.py", "--config", "configs/synthetic_demo.yaml",
           f"data.root={tmp / 'data'}", f"output_dir={out}", "log.progress=false", "log.tensorboard=false", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... exited {proc.returncode}: {proc.stderr[-1500:]}")
    return {**demo_result(out), "wall_s": time.perf_counter() - start}


def bench_demo(rounds: int = 2) -> dict:
    """``train.py`` with the demo recipe (CGBN as a group of one, Triton PMD-LAMB, AMP fp16,
    channels-last) as one process on this GPU, to box AP 0.5, with ``eval.mode`` sync and
    background alternating (hvdet.eval.background's evaluator shares the GPU)."""
    tmp = demo_data()
    runs = {"sync": [], "background": []}
    for _ in range(rounds):
        for mode, done in runs.items():
            done.append(train_demo(tmp, f"{mode}{len(done)}", f"eval.mode={mode}"))
            print(f"gpu-check: demo eval.mode={mode}: {done[-1]}", flush=True)
    med = {m: statistics.median(r["time_to_target_s"] or float("inf") for r in v) for m, v in runs.items()}
    first = runs["sync"][0]["ap"]  # cuDNN's algorithms may differ run to run: compare sync with sync too
    return {"runs": runs, "time_to_target_s_median": med, "background / sync": med["background"] / med["sync"],
            "same_ap_at_same_snapshots": all(first[k] == r["ap"].get(k) for r in runs["background"] for k in first),
            "sync_runs_agree": all(first[k] == r["ap"].get(k) for r in runs["sync"] for k in first)}


# ---------------------------------------------------------------------------------------------
# 6. Horovod's CUDA path: horovodrun -np 1 on this GPU
# ---------------------------------------------------------------------------------------------

def horovodrun(np_: int = 1) -> tuple[str, ...]:
    """``horovodrun -np N --gloo`` on this host (the Gloo controller: the lent machine's Horovod is
    built without MPI)."""
    exe = shutil.which("horovodrun")
    runner = (exe,) if exe else (sys.executable, "-m", "horovod.runner.launch")
    return (*runner, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo")


def allreduce_check(launcher: tuple[str, ...], env: dict, timeout_s: float) -> dict:
    """``launch/allreduce_check.py --backends`` under ``launcher``: its exit code and rank 0's report."""
    try:
        proc = subprocess.run([*launcher, sys.executable, "launch/allreduce_check.py", "--backends"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "output": f"no answer within {timeout_s:.0f} s"}
    found = [line.split("backends: ", 1)[1] for line in proc.stdout.splitlines() if "backends: " in line]
    return {"returncode": proc.returncode,
            **(json.loads(found[0]) if found else {"output": (proc.stdout + proc.stderr)[-1500:]})}


def bench_horovod(timeout_s: float = 300) -> dict:
    """Horovod's CUDA build under ``horovodrun -np 1``: (a) ``launch/allreduce_check.py --backends``,
    a gradient-like group of this device's tensors allreduced through Horovod, fp32 and fp16-compressed,
    and the backend its timeline names (``NCCL_ALLREDUCE`` on a GPU); (b) ``pytest -m gpu`` under it;
    (c) the demo trained by train.py under it with ``solver.fp16_allreduce=true``. In a world of one
    Horovod's optimizer registers no gradient hooks, so (c) shows training under horovodrun on the
    GPU and (a) the NCCL path; gradients through NCCL between ranks need two GPUs."""
    if not comm.horovod_available():
        return {"skipped": "Horovod is not importable here (on the lent machine: launch/gpu_wheels.sh's .whl/ "
                           "was not carried); see docs/gpu.md"}
    launcher = horovodrun()
    result = {"launcher": " ".join(launcher)}
    # The checkout on the path: on the lent machine hvdet is not installed, and a script under launch/
    # has launch/, not the checkout, as its first sys.path entry.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result["allreduce_check"] = allreduce_check(launcher, env, timeout_s)
    if result["allreduce_check"]["returncode"] != 0:
        # Where horovodrun itself fails (its host and interface discovery), Horovod initialized as a world
        # of one in a plain process still shows which backend reduces CUDA tensors.
        result["allreduce_check_without_horovodrun"] = allreduce_check((), env, timeout_s)
    result["pytest_gpu_under_horovodrun"] = run_pytest(launcher)
    try:
        result["demo_fp16_allreduce"] = train_demo(demo_data(), "horovodrun", "eval.mode=sync",
                                                   "solver.fp16_allreduce=true", launcher=launcher, timeout_s=timeout_s)
    except (RuntimeError, subprocess.TimeoutExpired) as err:  # the other two parts' results are kept
        result["demo_fp16_allreduce"] = {"error": str(err)}
    backends = result["allreduce_check"].get("allreduce_backends", [])
    result["nccl_path"] = "NCCL_ALLREDUCE" in backends
    print(f"gpu-check: horovod: {json.dumps(result)[:2000]}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# 8. CUDA graphs: the layer and the backbone step with the host's launches taken out
#    (7., the host-overhead breakdown, is benchmarks/gpu_host.py)
# ---------------------------------------------------------------------------------------------

GRAPH_CASES = ("bn_layer_nchw", "backbone_step_fp32")
GRAPH_BNS = ("cudnn_batchnorm", "cgbn_triton")
GRAPH_MODES = ("eager", "graphed_callables", "whole_step")


def graph_case(case: str):
    """(bn name -> maker of a fresh module, the static input, fwd_bwd(module, input), rounds, reps):
    one BN layer ([2, 256, 200, 336] fp32 NCHW, backward from a fixed dy) or the R50-FPN backbone
    step (8 x 512², fp32)."""
    if case == "bn_layer_nchw":
        shape = (2, 256, 200, 336)
        x = torch.randn(shape, device="cuda", requires_grad=True)
        dy = torch.randn(shape, device="cuda")
        made = bn_variants(shape[1])
        return ({bn: (lambda make=made[bn]: make().cuda()) for bn in GRAPH_BNS}, x,
                lambda module, inp: module(inp).backward(dy), 5, 10)
    if case == "backbone_step_fp32":
        images = torch.randn(8, 3, 512, 512, device="cuda")
        return ({bn: functools.partial(r50_fpn, bn) for bn in GRAPH_BNS}, images,
                lambda net, inp: feature_loss(net(inp)).backward(), 3, 5)
    raise ValueError(f"unknown graph case {case!r}: {GRAPH_CASES}")


def _zero(module: nn.Module, inp: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    inp.grad = None


def graph_step(mode: str, module: nn.Module, inp: torch.Tensor, fwd_bwd):
    """One training step (grads to None, forward, backward) of ``module`` on ``inp``: ``eager``;
    ``graphed_callables``: the module's forward and backward captured by
    ``torch.cuda.make_graphed_callables``; ``whole_step``: forward and backward captured as one graph
    (torch's "whole network capture": warm-up on a side stream, grads None before the capture so that
    it allocates them, each replay rewrites them)."""
    if mode == "eager":
        return lambda: (_zero(module, inp), fwd_bwd(module, inp))
    if mode == "graphed_callables":
        graphed = torch.cuda.make_graphed_callables(module, (inp,))
        return lambda: (_zero(graphed, inp), fwd_bwd(graphed, inp))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _zero(module, inp)
            fwd_bwd(module, inp)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    _zero(module, inp)
    with torch.cuda.graph(graph):
        fwd_bwd(module, inp)
    return graph.replay


def bench_graphs_case(case: str, only: str | None = None) -> dict:
    """cuDNN BN and CGBN (Triton, group path with a group of one) in ``case``, eager and in CUDA graphs
    both ways (:func:`graph_step`), timed interleaved: what is left of CGBN's cost once the host's
    launches are out of the picture. ``only``: that one variant ("cgbn_triton whole_step"), the
    triage of a case whose process died. A capture that raises is reported, the others still run."""
    makers, inp, fwd_bwd, rounds, reps = graph_case(case)
    steps, errors = {}, {}
    for bn in GRAPH_BNS:
        for mode in GRAPH_MODES:
            name = f"{bn} {mode}"
            if only and name != only:
                continue
            try:
                steps[name] = graph_step(mode, makers[bn](), inp, fwd_bwd)
                steps[name]()
                torch.cuda.synchronize()  # a graph that faults does it here, named by the triage
            except Exception as err:  # noqa: BLE001 - reported in the JSON
                steps.pop(name, None)
                errors[name] = f"{type(err).__name__}: {err}"[:500]
    timings = time_variants(steps, rounds=rounds, reps=reps) if steps else {}
    ms = {k: v["median_ms"] for k, v in timings.items()}
    floor = ms.get("cudnn_batchnorm eager")
    ratios = {f"{k} / cudnn_batchnorm eager": v / floor for k, v in ms.items()
              if floor and k != "cudnn_batchnorm eager"}
    if "cudnn_batchnorm whole_step" in ms and "cgbn_triton whole_step" in ms:
        ratios["cgbn_triton whole_step / cudnn_batchnorm whole_step"] = (
            ms["cgbn_triton whole_step"] / ms["cudnn_batchnorm whole_step"])
    return {"timings": timings, "capture_errors": errors, **ratios}


def _graphs_child(case: str, only: str | None, timeout_s: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "graphs.json"
        cmd = [sys.executable, __file__, "--graph-case", case, "--out", str(out),
               *(["--graph-variant", only] if only else [])]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"ran past {timeout_s} s"}
        if out.exists():
            return json.loads(out.read_text())
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # The C++ abort's own lines (what(), the error) and a Python error before them, if any.
        keep = [ln for ln in lines if "Error" in ln or "what()" in ln or "error" in ln][:8] or lines[-8:]
        return {"error": f"exited with {proc.returncode} before its result: " + " | ".join(keep)[:1500]}


def bench_graphs(timeout_s: int = 240) -> dict:
    """Each case of :func:`bench_graphs_case` in a child process: a fault in a captured graph (an illegal
    address, as on the 2026-12-04 run) aborts the process that made it, and the parts measured before
    must stay in the JSON. A case whose child dies is triaged: each variant alone in a child, to name
    the one that faults."""
    out = {}
    for case in GRAPH_CASES:
        out[case] = result = _graphs_child(case, None, timeout_s)
        print(f"gpu-check: graphs {case}: {json.dumps(result)[:600]}", flush=True)
        if "error" in result:
            result["triage"] = {}
            for name in (f"{bn} {mode}" for bn in GRAPH_BNS for mode in GRAPH_MODES):
                alone = _graphs_child(case, name, timeout_s)
                result["triage"][name] = alone.get("error") or alone["capture_errors"].get(name) or "ran"
                print(f"gpu-check: graphs {case} triage {name}: {result['triage'][name][:300]}", flush=True)
    return out


def run_pytest(launcher: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([*launcher, sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py",
                           "tests/test_background_eval.py", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=-ra"], check=False, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - start}


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "horovod": comm.horovod_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
           if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    info["cpu"] = f"{cpu[0] if cpu else platform.processor()} x {os.cpu_count()}"
    info["uptime"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    return info


def cpu_smoke() -> None:
    """The GPU check's code paths on CPU tensors: it runs, it agrees (no speed is measured)."""
    comm.init()
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(32))]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(ref, params, strict=True):
        p.grad = q.grad.clone()
    PMDLAMB(params, lr=0.1).step()
    PMDLAMB(ref, lr=0.1, impl="reference").step()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in zip(params, ref, strict=True)), "LAMB impls disagree"
    layer = group_path(CrossGPUBatchNorm2d(8))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    nn.BatchNorm2d(8)(xr).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-5), "CGBN group path disagrees with BatchNorm2d"
    print("gpu-check: CPU smoke test passed (PMD-LAMB cpp/reference agree; CGBN group path == BatchNorm2d)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--skip-tests", action="store_true", help="measurements only")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="these measurements only")
    parser.add_argument("--graph-case", choices=GRAPH_CASES, help=argparse.SUPPRESS)  # bench_graphs' child
    parser.add_argument("--graph-variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    info = machine()
    print(f"gpu-check: {json.dumps(info)}", flush=True)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU found; ran the CPU-safe parts only, measured nothing")
        cpu_smoke()
        if "horovod" in (args.only or ()):
            # A rehearsal of the Horovod part on CPU tensors (Gloo where the GPU would show NCCL).
            ok = horovod_ok(bench_horovod(), backend="GLOO_ALLREDUCE")
            print(f"gpu-check: horovod rehearsal on CPU {'passed' if ok else 'FAILED'}")
            return 0 if ok else 1
        return 0
    comm.init()
    torch.backends.cudnn.benchmark = True
    if args.graph_case:  # bench_graphs' child: one case (or one variant of it), nothing else
        Path(args.out).write_text(json.dumps(bench_graphs_case(args.graph_case, args.graph_variant)) + "\n")
        return 0
    result = {"machine": info, "provenance": provenance(),
              "not_covered": "multi-rank NCCL collectives (gradients between ranks), AGVM: need two GPUs / ranks"}
    if not args.skip_tests:
        result["pytest_gpu"] = run_pytest()
    result["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    for name in args.only or MEASUREMENTS:
        fn = MEASUREMENTS[name]
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"gpu-check: {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    tests_ok = result.get("pytest_gpu", {}).get("returncode", 0) == 0
    return 0 if tests_ok and horovod_ok(result.get("horovod", {}), backend="NCCL_ALLREDUCE") else 1


def horovod_ok(r: dict, backend: str) -> bool:
    """The Horovod part passed (or was skipped: no Horovod here): the allreduce went through
    ``backend`` exactly, the tests passed under horovodrun, and the demo reached its target."""
    if not r or "skipped" in r:
        return True
    check = r.get("allreduce_check", {})
    return (check.get("returncode") == 0 and check.get("allreduce_backends") == [backend]
            and r.get("pytest_gpu_under_horovodrun", {}).get("returncode") == 0
            and bool(r.get("demo_fp16_allreduce", {}).get("reached")))


def print_table(r: dict) -> None:
    rows = [("GPU", f"{r['machine'].get('gpu')} (torch {r['machine']['torch']}, triton {r['machine']['triton']})"),
            ("pytest -m gpu", r.get("pytest_gpu", {}).get("summary", "skipped")),
            ("copy bandwidth", f"{r['copy_bandwidth_gbs']:.0f} GB/s")]
    lamb = r.get("lamb_step", {})
    if "timings" in lamb:
        for k, v in lamb["timings"].items():
            rows.append((f"LAMB step: {k}", f"{v['median_ms']:.3f} ms (host issues it in {v['host_issue_ms']:.3f} ms)"))
        for name, ks in lamb.get("kernels", {}).items():
            rows.append((f"  {name} device time", f"{ks['total_device_us']} us"))
            rows += [(f"    {k['kernel'][:40]}", f"{k['device_us']:.0f} us x{k['calls']}") for k in ks["top"][:4]]
        rows.append(("LAMB device-time ratio triton / adamw",
                     str(lamb.get("device_time_ratio hvdet_triton / torch_adamw_fused"))))
        rows += [(f"LAMB {k}", f"{v:.2f}") for k, v in lamb["ratios"].items()]
        rows += [(f"LAMB achieved {k}", f"{v:.0f} GB/s") for k, v in lamb["achieved_gbs"].items()]
    for section in ("bn_layer", "backbone_step"):
        for setting, v in r.get(section, {}).items():
            if isinstance(v, dict) and "timings" in v:
                t = {k: f"{x['median_ms']:.2f} (host {x['host_issue_ms']:.2f})" for k, x in v["timings"].items()}
                rows.append((f"{section} {setting} ms", json.dumps(t)))
                for name, ks in v.get("kernels", {}).items():
                    rows.append((f"  {name} device time", f"{ks['total_device_us']} us"))
                    rows += [(f"    {k['kernel'][:40]}", f"{k['device_us']:.0f} us x{k['calls']}")
                             for k in ks["top"][:6]]
                if "device_time_ratio cgbn_triton / cudnn" in v:
                    rows.append((f"{section} {setting} device-time cgbn_triton / cudnn",
                                 str(v["device_time_ratio cgbn_triton / cudnn"])))
                rows += [(f"{section} {setting} {key}", f"{v[key]:.3f}") for key in
                         ("cgbn_triton / cudnn", "torch_syncbn / cudnn", "cgbn_triton / torch_syncbn") if key in v]
    demo = r.get("demo", {})
    if "runs" in demo:
        rows += [(f"demo time to AP 0.5, eval {k}", f"{v:.1f} s (median)")
                 for k, v in demo["time_to_target_s_median"].items()]
        same = demo["same_ap_at_same_snapshots"]
        rows.append(("demo background / sync",
                     f"{demo['background / sync']:.2f}; same AP at the same snapshots: {same}"))
    for setting, v in r.get("host_overhead", {}).get("host_us_per_call", {}).items():
        rows.append((f"host us/call: {setting}", f"{v}"))
    if "device_ops_per_layer_step" in r.get("host_overhead", {}):
        rows.append(("device ops per layer step", json.dumps(r["host_overhead"]["device_ops_per_layer_step"])))
    for setting, v in r.get("graphs", {}).items():
        if isinstance(v, dict) and "timings" in v:
            rows += [(f"graphs {setting} {k} ms", f"{x['median_ms']:.3f} (host {x['host_issue_ms']:.3f})")
                     for k, x in v["timings"].items()]
            rows += [(f"graphs {setting} {k}", f"{x:.3f}") for k, x in v.items() if " / " in k]
            rows += [(f"graphs {setting} {k} FAILED", e[:200]) for k, e in v["capture_errors"].items()]
        if isinstance(v, dict) and "error" in v:
            rows.append((f"graphs {setting} FAILED", v["error"][:200]))
            rows += [(f"graphs {setting} alone: {k}", e[:200]) for k, e in v.get("triage", {}).items()]
    hv = r.get("horovod", {})
    if "allreduce_check" in hv:
        check = hv["allreduce_check"]
        rows.append(("horovodrun -np 1: allreduce backends",
                     f"{check.get('allreduce_backends')}, exact: {check.get('exact')}"))
        rows.append(("horovodrun -np 1: pytest -m gpu", hv["pytest_gpu_under_horovodrun"]["summary"]))
        d = hv["demo_fp16_allreduce"]
        rows.append(("horovodrun -np 1: demo, fp16_allreduce", d.get("error", "")[:200] or
                     f"reached {d['reached']} in {d['time_to_target_s']} s, {d['images_per_s']:.1f} images/s"))
    elif "skipped" in hv:
        rows.append(("horovod", hv["skipped"]))
    det = r.get("detector_step", {})
    if "images_per_s" in det:
        rows += [(f"detector images/s {k}", f"{v:.1f}") for k, v in det["images_per_s"].items()]
    for section in MEASUREMENTS:
        if "error" in r.get(section, {}):
            rows.append((f"{section} FAILED", r[section]["error"][:200]))
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))


MEASUREMENTS = {"lamb_step": bench_lamb, "bn_layer": bench_bn_layer, "backbone_step": bench_backbone,
                "detector_step": bench_detector, "demo": bench_demo, "horovod": bench_horovod,
                "host_overhead": bench_host_overhead, "graphs": bench_graphs}

if __name__ == "__main__":
    sys.exit(main())

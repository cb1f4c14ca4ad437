"""Where a Cross-GPU BN layer's host time goes on a GPU (gpu_check's ``host_overhead`` part).

On the H200 of 2026-12-04 (benchmarks/results/gpu_check.json) CGBN's kernels took less device time
than cuDNN's (0.86x, fp32 NCHW), yet its layer step took 2.5x as long: the wall time was the host's
time to issue the step. This part says where that host time goes: host microseconds per call of
each piece of the layer (at a tiny shape, so the device never holds the host back), the kernels
each layer step launches (torch.profiler), and a cProfile of the forward (the backward runs on
autograd's device thread, which cProfile does not see; its pieces are timed one by one). The
per-call helpers it shares with gpu_check (:func:`kernel_breakdown`, :func:`layer_step`) live here.
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from hvdet import comm
from hvdet.nn import CrossGPUBatchNorm2d
from hvdet.nn.cross_gpu_bn import _check_count, _CrossGPUBatchNormFn, group_moments

SHAPE = (2, 256, 8, 8)  # device work of a few microseconds per kernel: the host is what is timed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn, device: torch.device, calls: int = 200, rounds: int = 5) -> float:
    """Median host microseconds to issue one call of ``fn`` (synchronized between rounds only)."""
    for _ in range(min(calls, 10)):
        fn()
    sync(device)
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) * 1e6 / calls)
        sync(device)
    return round(statistics.median(per_call), 1)


def kernel_breakdown(fn, top: int = 10) -> dict:
    """The device operations (kernels, copies, memsets) one call of ``fn`` runs (torch.profiler): how
    many, their total device time, and the ``top`` ones by device time, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - the profiler is a diagnosis, not the measurement
        return {"total_device_us": None, "device_ops": None, "top": [],
                "error": f"profiler failed: {type(err).__name__}: {err}"}
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if dev_us > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count, "device_us": round(dev_us, 1)})
    return {"total_device_us": round(sum(r["device_us"] for r in rows), 1),
            "device_ops": sum(r["calls"] for r in rows),
            "top": sorted(rows, key=lambda r: -r["device_us"])[:top]}


def forward_profile(layer: nn.Module, x: torch.Tensor, calls: int = 300, top: int = 25) -> list[str]:
    """cProfile's ``top`` functions by own time over ``calls`` training forwards of ``layer``."""
    for _ in range(min(calls, 10)):
        layer(x)
    sync(x.device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        layer(x)
    prof.disable()
    sync(x.device)
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:top]
    # Per layer call: own and cumulative microseconds, calls; (file, line, function) as cProfile names them.
    return [f"{own / calls * 1e6:7.1f} us own {cum / calls * 1e6:7.1f} us cum x{n / calls:g}  "
            f"{func} ({Path(file).name}:{line})" for (file, line, func), (_, n, own, cum, _) in rows]


def layer_step(layer, x: torch.Tensor, dy: torch.Tensor, threads: bool = True):
    """One forward + backward of ``layer`` on ``x`` with upstream gradient ``dy``; ``threads=False``: the
    backward on the calling thread instead of autograd's device thread."""
    def run():
        x.grad = None
        with torch.autograd.set_multithreading_enabled(threads):
            layer(x).backward(dy)
    return run


class _Identity(torch.autograd.Function):
    """y = x with a Python backward: what autograd's node for a Python Function costs the host."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def bench_host_overhead(calls: int = 200, rounds: int = 5, device: torch.device | None = None) -> dict:
    """The pieces' host times, the device operations per layer step and the forward's cProfile on
    ``device`` (default: the current GPU; a CPU under TRITON_INTERPRET=1 runs it as a smoke test)."""
    import triton
    import triton.language as tl

    from hvdet.ops import bn_triton

    @triton.jit
    def _noop(ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + i, tl.load(ptr + i, mask=i < n), mask=i < n)

    comm.init()
    dev = device or torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(SHAPE, device=dev, requires_grad=True)
    xd, dy = x.detach(), torch.randn(SHAPE, device=dev)
    c = SHAPE[1]
    one = torch.zeros(1, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    w, b = torch.ones(c, device=dev), torch.zeros(c, device=dev)
    group = comm.consecutive_groups(1)
    local = bn_triton.local_moments_packed(xd)
    parts = local[None]
    mean, var, n = bn_triton.group_stats(parts, torch.float32, rm, rv, 0.1)
    total, _, _ = bn_triton.grad_sums_packed(dy, xd, mean, var, 1e-5, torch.float32)
    # What the layer's forward leaves for its backward, to time the backward's body on this thread.
    ctx = SimpleNamespace(saved_tensors=(xd, w, mean, var), eps=1e-5, n=n, group=group, backend="auto",
                          impl="auto", needs_input_grad=(True, True, True))
    cudnn = nn.BatchNorm2d(c).to(dev)
    cgbn = CrossGPUBatchNorm2d(c).to(dev)
    cgbn.force_group_path = True
    pieces = {
        "timer floor (a Python call doing nothing)": lambda: None,
        "torch op, 1 element (one.add_(1))": lambda: one.add_(1),
        "torch.empty(256) on the GPU": lambda: torch.empty(256, device=dev),
        "Triton launch, 2 arguments (noop)": lambda: _noop[(1,)](one, 1, BLOCK=32),
        "fwd 1: _moments (local_moments_packed)": lambda: bn_triton.local_moments_packed(xd),
        "fwd: allgather, group of one": lambda: group.allgather(local),
        "fwd 2: _group_stats": lambda: bn_triton.group_stats(parts, torch.float32, rm, rv, 0.1),
        "fwd: count check (torch._assert_async)": lambda: _check_count(n),
        "fwd: normalize (F.batch_norm eval, cuDNN)": lambda: F.batch_norm(xd, mean, var, w, b, False, 0.0, 1e-5),
        "fwd: group_moments (1 + allgather + 2 + check)": lambda: group_moments(xd, group, running=(rm, rv, 0.1)),
        "bwd 3: _backward_reduce (grad_sums_packed)":
            lambda: bn_triton.grad_sums_packed(dy, xd, mean, var, 1e-5, torch.float32),
        "bwd: allreduce, group of one": lambda: group.allreduce(total),
        "bwd 4: _input_grad": lambda: bn_triton.input_grad(dy, xd, total, n, w, mean, var, 1e-5),
        "layer forward, cuDNN BatchNorm2d (train)": lambda: cudnn(xd),
        "layer forward, CGBN (train, needs grad)": lambda: cgbn(x),
        "layer step (fwd + bwd), cuDNN BatchNorm2d": layer_step(cudnn, x, dy),
        "layer step (fwd + bwd), CGBN": layer_step(cgbn, x, dy),
        "bwd: CGBN backward's body, called on this thread": lambda: _CrossGPUBatchNormFn.backward(ctx, dy),
        "step of x * 1 (a C++ backward node)": layer_step(lambda t: t * 1.0, x, dy),
        "step of an identity Function (a Python backward node)": layer_step(_Identity.apply, x, dy),
        "layer step, cuDNN, backward on this thread": layer_step(cudnn, x, dy, threads=False),
        "layer step, CGBN, backward on this thread": layer_step(cgbn, x, dy, threads=False),
    }
    if dev.type == "cuda":  # bn_plan.counters asks for it on every launch of _moments and _backward_reduce
        pieces["torch.cuda.current_stream().stream_id"] = lambda: torch.cuda.current_stream(dev).stream_id
    return {"shape": list(SHAPE),
            "host_us_per_call": {name: host_us(fn, dev, calls, rounds) for name, fn in pieces.items()},
            "device_ops_per_layer_step": {name: kernel_breakdown(layer_step(layer, x, dy))["device_ops"]
                                          if dev.type == "cuda" else None
                                          for name, layer in (("cudnn_batchnorm", cudnn), ("cgbn_triton", cgbn))},
            "cgbn_forward_cprofile": forward_profile(cgbn, x, calls=calls)}

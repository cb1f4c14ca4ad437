"""Learning-rate schedules as pure functions of the iteration, and the one adapter that applies them.

Conventions: ``iteration`` counts from 0; an lr returned for iteration i is used by the i-th
optimizer step. Training lengths are in iterations; :func:`epochs_to_iters` converts, so a recipe
keeps its epochs (and thus its number of images seen) when the global batch changes.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch


def linear_scaled_lr(base_lr: float, global_batch: int, base_batch: int = 16) -> float:
    """Linear scaling rule (Goyal et al.; MegDet 3.2): lr = base_lr * global_batch / base_batch.

    The detection baseline is lr 0.02 at batch 16, so batch 256 gets 0.32.
    """
    if global_batch <= 0 or base_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got global_batch={global_batch}, base_batch={base_batch}")
    return base_lr * global_batch / base_batch


def warmup_factor(iteration: int, warmup_iters: int, start_factor: float = 0.001) -> float:
    """Linear gradual warmup: start_factor at iteration 0, rising linearly to 1 at warmup_iters."""
    if iteration >= warmup_iters:
        return 1.0
    progress = iteration / warmup_iters
    return start_factor * (1.0 - progress) + progress


def step_lr(iteration: int, base_lr: float, steps: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0,
            warmup_start_factor: float = 0.001) -> float:
    """Multi-step decay: base_lr * gamma^(number of steps <= iteration), times the warmup factor.

    ``steps`` are iterations (use :func:`epochs_to_iters` for epochs), e.g. LargeDet's batch-320
    Faster R-CNN: base_lr 0.4, steps (2400, 3200), stop at 3360.
    """
    if list(steps) != sorted(steps):
        raise ValueError(f"steps must be increasing, got {list(steps)}")
    decay = gamma ** bisect.bisect_right(list(steps), iteration)
    return base_lr * decay * warmup_factor(iteration, warmup_iters, warmup_start_factor)


def cosine_lr(iteration: int, base_lr: float, max_iters: int, warmup_iters: int = 0,
              warmup_start_factor: float = 0.001, final_lr: float = 0.0) -> float:
    """final_lr + (base_lr - final_lr) * (1 + cos(pi * i / max_iters)) / 2, times the warmup factor;
    final_lr from max_iters on."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(iteration, max_iters) / max_iters
    lr = final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * warmup_factor(iteration, warmup_iters, warmup_start_factor)


def scale_iterations(iterations: int, factor: float) -> int:
    """The "longer" training policy (LargeDet Table 2, "1.4x"): an iteration count times factor,
    rounded half up (2400 -> 3360 at 1.4x). Apply it to max_iters and every decay step alike."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    # The 1e-9 absorbs binary error (2400 * 1.4 = 3360.0000000000005) before rounding.
    return math.floor(iterations * factor + 0.5 + 1e-9)


def epochs_to_iters(epochs: float, dataset_size: int, global_batch: int) -> int:
    """Iterations that cover ``epochs`` passes over the dataset at this global batch (rounded up,
    so no image of the last epoch is dropped). Keeps epochs constant when the batch changes."""
    if dataset_size <= 0 or global_batch <= 0:
        raise ValueError(f"dataset_size and global_batch must be positive, got {dataset_size}, {global_batch}")
    return math.ceil(epochs * dataset_size / global_batch - 1e-9)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr * group["lr_scale"]`` into every param group (lr_scale is AGVM's per-module factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

"""A recipe on a world size: global batch, peak lr, length, and the one learning-rate function.

**Linear scaling rule (MegDet 3.2, Goyal et al.).** A recipe states ``images_per_gpu`` and the
reference point of its learning rate (``solver.base_lr`` at ``solver.reference_batch`` images); the
global batch and the global lr follow from the number of ranks at run time:

    global_batch = images_per_gpu * world_size * backward_passes_per_step
    lr = base_lr * global_batch / reference_batch         (e.g. 0.02 * 320 / 16 = 0.4, LargeDet Table 4)
    lr = base_lr * sqrt(global_batch / reference_batch)   (lr_scaling: sqrt, the square-root rule; a control)

**Lengths given in epochs** follow the global batch: the run (``max_epochs``), its lr steps, the warmup
(``warmup_epochs``, with ``warmup_iters`` as a floor: epochs alone leave a batch-512 run a few warmup
steps), PMD-LAMB's cycle (``cycle_epochs``) and AGVM's interval and smoothing, so that a batch sweep at
equal epochs keeps every mechanism's share of the run.

The lr of every iteration is :func:`lr_at` (warmup, then step or cosine decay): a pure function of
the iteration, so a resumed run needs only the iteration, and the training step, its log record and
a checkpoint all read the same value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hvdet.config import Config
from hvdet.optim.schedules import cosine_lr, epochs_to_iters, linear_scaled_lr, scale_iterations, step_lr


@dataclass
class Plan:
    world_size: int
    global_batch: int
    lr: float          # peak lr: base_lr * global_batch / reference_batch (linear scaling rule)
    max_iters: int
    steps: list[int]
    warmup_iters: int = 0
    cycle_length: int | None = None    # PMD-LAMB's T in iterations (None: LAMB, no cycle)
    agvm_interval: int = 10
    agvm_momentum: float = 0.97


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks."""
    return cfg.data.images_per_gpu * world_size * cfg.solver.backward_passes_per_step


def scaled_lr(cfg: Config, world_size: int) -> float:
    """The global lr for this world size: base_lr * global_batch / reference_batch."""
    if cfg.solver.lr_scaling == "none":
        return cfg.solver.base_lr
    if cfg.solver.lr_scaling == "sqrt":
        return cfg.solver.base_lr * math.sqrt(global_batch(cfg, world_size) / cfg.solver.reference_batch)
    return linear_scaled_lr(cfg.solver.base_lr, global_batch(cfg, world_size), cfg.solver.reference_batch)


def plan_run(cfg: Config, world_size: int, dataset_size: int) -> Plan:
    """Global batch, lr and iterations on ``world_size`` ranks (epoch schedules need ``dataset_size``)."""
    s, batch = cfg.solver, global_batch(cfg, world_size)
    if s.max_epochs:
        max_iters = epochs_to_iters(s.max_epochs, dataset_size, batch)
        steps = [epochs_to_iters(e, dataset_size, batch) for e in s.step_epochs]
    else:
        max_iters, steps = s.max_iters, list(s.steps)
    if s.iters_at_batch:  # fewer iterations of a larger batch: the same epochs
        max_iters = scale_iterations(max_iters, s.iters_at_batch / batch)
        steps = [scale_iterations(x, s.iters_at_batch / batch) for x in steps]
    if s.iterations_scale != 1.0:  # the "1.4x" policy stretches the whole schedule
        max_iters = scale_iterations(max_iters, s.iterations_scale)
        steps = [scale_iterations(x, s.iterations_scale) for x in steps]
    def iters(epochs: float) -> int:
        return epochs_to_iters(epochs, dataset_size, batch)

    warmup = max(s.warmup_iters, iters(s.warmup_epochs) if s.warmup_epochs else 0)
    cycle = s.cycle_length if s.cycle_epochs is None else max(1, iters(s.cycle_epochs))
    interval, momentum = agvm_timing(cfg.agvm.interval, cfg.agvm.momentum,
                                     iters(cfg.agvm.interval_epochs) if cfg.agvm.interval_epochs else None,
                                     iters(cfg.agvm.time_constant_epochs) if cfg.agvm.time_constant_epochs else None)
    return Plan(world_size, batch, scaled_lr(cfg, world_size), max_iters, steps, warmup, cycle, interval, momentum)


def agvm_timing(interval: int, momentum: float, interval_iters: int | None = None,
                time_constant_iters: int | None = None) -> tuple[int, float]:
    """AGVM's (interval, momentum) in iterations. Its lr scales are an exponential moving average
    updated every ``interval`` iterations, so their time constant is interval / (1 - momentum)
    iterations (upstream: 10 / 0.03 = 333). Given a time constant, momentum = 1 - interval / it
    (0 when the interval is longer: each estimate replaces the last)."""
    interval = max(1, interval_iters) if interval_iters else interval
    if time_constant_iters:
        momentum = max(0.0, 1.0 - interval / time_constant_iters)
    return interval, momentum


def lr_at(cfg: Config, plan: Plan, step: int) -> float:
    """The global lr of 0-based iteration ``step``: linear warmup, then step or cosine decay."""
    s = cfg.solver
    if s.schedule == "cosine":
        return cosine_lr(step, plan.lr, plan.max_iters, plan.warmup_iters, s.warmup_start_factor, s.final_lr)
    return step_lr(step, plan.lr, plan.steps, s.gamma, plan.warmup_iters, s.warmup_start_factor)

"""One training iteration, from its parts: batches in, averaged gradients applied, losses out.

    settings = StepSettings.from_solver(cfg.solver, comm.device())      # once per run
    result = train_step(model, optimizer, scaler, batches, settings, step=t, lr=lr_at(cfg, plan, t))

On every rank (``backward_passes_per_step`` batches of ``images_per_gpu`` images each):

1. next batch                                                                             data_s
2. forward under autocast when AMP is on: the detector's loss dict                        forward_s
3. collective loss check (comm.allreduce_small), then backward of the (AMP-scaled) loss; Horovod
   averages every gradient as soon as it is ready; ``synchronize()`` waits for them      backward_allreduce_s
4. :func:`apply_gradients`: AGVM (if on) on the still-scaled gradients, unscale, ``set_lr``
   writes lr(t) * lr_scale, clipping of the averaged gradients, ``step()`` inside
   ``skip_synchronize()``                                                                optimizer_s

The optimizer is Horovod's DistributedOptimizer (``hvdet.comm.distributed_optimizer``) in a
training run, or a plain torch optimizer in a world of one (the unit tests use that): everything
here takes its parts as arguments and knows nothing of the run around it. Under ``comm.gradients:
ddp`` it is the same optimizer with DistributedDataParallel behind Horovod's protocol
(:mod:`hvdet.comm.torch_world`): each forward runs through the module its ``forward_pass`` gives,
and DDP averages the gradients inside backward (its ``synchronize()`` has nothing left to wait for).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hvdet import comm
from hvdet.errors import HvdetError
from hvdet.optim.schedules import set_lr  # lr * group["lr_scale"] (AGVM) into every group


class DivergenceError(HvdetError, RuntimeError):
    """The loss became NaN/inf: the run failed, as the papers' tables record it ("Failed")."""


def autocast_dtype(amp: bool, amp_dtype: str, amp_on_cpu: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run on ``device`` (solver.amp, amp_dtype, amp_on_cpu), or None for fp32."""
    if device.type == "cuda":
        return getattr(torch, amp_dtype) if amp else None
    return torch.bfloat16 if amp_on_cpu else None  # CPUs have fast bf16, no fast fp16


def autocast(device: torch.device, dtype: torch.dtype | None, cuda_graphs: bool = False):
    """The step's autocast (off for fp32); without its weight cache under CUDA graphs, which
    ``torch.cuda.make_graphed_callables`` refuses."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None,
                          cache_enabled=False if cuda_graphs else None)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


@dataclass(frozen=True)
class StepSettings:
    """What a step takes from the recipe, resolved once per run (not every iteration).

    ``passes``: backward passes per optimizer step (solver.backward_passes_per_step); ``amp_dtype``:
    the autocast dtype or None for fp32 (:func:`autocast_dtype`); ``clip_grad_norm``: the max norm of
    the averaged gradients, or None; ``device``: where batches go (None: ``comm.device()``);
    ``cuda_graphs``: the backbone runs as CUDA graphs (solver.cuda_graphs), which autocast's weight
    cache would break."""
    passes: int = 1
    amp_dtype: torch.dtype | None = None
    clip_grad_norm: float | None = None
    device: torch.device | None = None
    cuda_graphs: bool = False

    @classmethod
    def from_solver(cls, solver, device: torch.device) -> StepSettings:
        """The settings of a recipe's ``solver`` section on ``device``."""
        dtype = autocast_dtype(solver.amp, solver.amp_dtype, solver.amp_on_cpu, device)
        return cls(solver.backward_passes_per_step, dtype, solver.clip_grad_norm, device, solver.cuda_graphs)


@dataclass(frozen=True)
class StepResult:
    """A step's rank-averaged losses (each the mean over its passes), and whether any rank asked to
    stop (a preemption signal, agreed at the loss check: every rank gets the same answer)."""
    losses: dict
    stop_agreed: bool = False


@dataclass(frozen=True)
class LossCheck:
    """:func:`check_losses`'s result: the rank-mean losses, all finite or not, and the stop vote."""
    mean: torch.Tensor
    finite: bool
    stop_agreed: bool


class _NoTimer:
    def phase(self, name: str):
        return contextlib.nullcontext()

    def step(self) -> None:
        pass


def train_step(model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, batches: Iterator,
               settings: StepSettings = StepSettings(), *, step: int, lr: float, agvm=None, timer=None,
               stop_requested: bool = False) -> StepResult:
    """One optimizer step over ``settings.passes`` batches of ``batches``. ``step`` is the 0-based
    iteration, ``lr`` its learning rate; ``stop_requested``: this rank was signalled to stop (it rides
    on the loss check, and the result says whether any rank was). Raises DivergenceError on every
    rank alike when a loss is not finite on any."""
    timer = timer or _NoTimer()
    device, dtype, passes = settings.device or comm.device(), settings.amp_dtype, settings.passes
    optimizer.zero_grad()
    loss_sum, stop_agreed = None, False  # the logged losses cover all passes, not only the last
    for i in range(passes):
        with timer.phase("data_s"):
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
        with timer.phase("forward_s"), autocast(device, dtype, settings.cuda_graphs), \
                forward_module(optimizer, model, last=i == passes - 1) as module:
            loss_dict = module(images, targets)
        with timer.phase("backward_allreduce_s"):
            check = check_losses(loss_dict, stop_requested)
            if not check.finite:
                raise DivergenceError(f"diverged at iteration {step + 1} (lr {lr:.6g}): loss "
                                      f"{dict(zip(loss_dict, check.mean.tolist(), strict=True))}")
            stop_agreed |= check.stop_agreed
            loss_sum = check.mean if loss_sum is None else loss_sum + check.mean
            if agvm is not None:
                agvm.before_backward(step)  # local gradients, before Horovod replaces them by means
            # Horovod sums the passes' gradients locally and averages over ranks: divide by passes.
            scaler.scale(sum(loss_dict.values()) / passes).backward()
    with timer.phase("backward_allreduce_s"):
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is not None:
            synchronize()  # wait for the averaged gradients: clipping and AGVM must see the global ones
    with timer.phase("optimizer_s"):
        apply_gradients(optimizer, model, scaler, step, lr, agvm, settings.clip_grad_norm)
    timer.step()
    return StepResult(dict(zip(loss_dict, (loss_sum / passes).tolist(), strict=True)), stop_agreed)


def forward_module(optimizer, model: torch.nn.Module, last: bool = True):
    """A context giving the module a pass's forward calls: the model itself, whose parameters' hooks
    Horovod's optimizer averages through; or, for an optimizer with ``forward_pass`` (comm.gradients
    ddp), DistributedDataParallel's wrapper of it, which must see the forward to average in backward
    and accumulates locally on all passes but the ``last`` (Horovod's backward_passes_per_step)."""
    forward_pass = getattr(optimizer, "forward_pass", None)
    return contextlib.nullcontext(model) if forward_pass is None else forward_pass(last)


def check_losses(loss_dict: dict, stop_requested: bool = False) -> LossCheck:
    """The losses averaged over ranks, whether they are all finite, and whether any rank asked to stop.

    Collective, before backward: the mean over ranks is non-finite on every rank when any rank's
    loss is, so all ranks see the divergence here together; a rank that stopped alone would leave the
    others waiting forever in the gradient allreduce. One more element carries ``stop_requested`` (a
    preemption signal on this rank) to every rank, at no extra collective.
    """
    values = [v.detach().float() for v in loss_dict.values()]
    flag = torch.tensor(float(stop_requested), device=values[0].device)
    both = comm.allreduce_small(torch.stack([*values, flag]), op="mean", name="hvdet.losses")
    mean = both[:-1]
    return LossCheck(mean, bool(torch.isfinite(mean).all()), both[-1].item() > 0)


def apply_gradients(opt, model: torch.nn.Module, scaler: torch.amp.GradScaler, step: int, lr: float,
                    agvm=None, clip_grad_norm: float | None = None) -> None:
    """The optimizer half of a step, after ``opt.synchronize()`` (gradients averaged, still scaled).

    ``opt``: Horovod's DistributedOptimizer (hvdet.comm.distributed_optimizer; under comm.gradients
    ddp, the optimizer behind DDP, same protocol), or a plain optimizer in a world of one.

    The order matters: AGVM compares the world-mean gradients with the ones it captured during
    backward, which were scaled by the AMP loss scale, so it runs BEFORE unscaling (its variances,
    1 - cosine, do not depend on the scale); then unscale, the lr (AGVM's lr_scale applied), clipping
    of the true gradients, and the step, which the scaler skips if a gradient is inf/NaN.
    """
    if agvm is not None:
        agvm.after_synchronize(step)  # collective on due iterations; updates group["lr_scale"]
    scaler.unscale_(opt)
    set_lr(opt, lr)  # after AGVM: its lr_scale multiplies this iteration's lr
    if clip_grad_norm:
        # The same averaged gradients on every rank -> the same clip factor everywhere.
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    skip_sync = getattr(opt, "skip_synchronize", contextlib.nullcontext)
    with skip_sync():  # synchronized by the caller; step() must not allreduce a second time
        scaler.step(opt)
    scaler.update()

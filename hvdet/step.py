"""One training iteration, from its parts: batches in, averaged gradients applied, losses out.

    losses = train_step(model, optimizer, scaler, batches, step=t, lr=lr_at(cfg, plan, t))

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


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


class _NoTimer:
    def phase(self, name: str):
        return contextlib.nullcontext()

    def step(self) -> None:
        pass


def train_step(model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, batches: Iterator, *,
               step: int, lr: float, passes: int = 1, amp_dtype: torch.dtype | None = None, agvm=None,
               clip_grad_norm: float | None = None, timer=None, device: torch.device | None = None,
               stop=None) -> dict:
    """One optimizer step over ``passes`` batches of ``batches``; returns the rank-averaged losses
    (each the mean over the passes). ``step`` is the 0-based iteration, ``lr`` its learning rate.
    ``stop`` (a :class:`hvdet.preempt.StopRequest`) rides on the loss check: its ``agreed`` is set
    on every rank alike when any rank's ``requested`` is."""
    timer = timer or _NoTimer()
    device = device or comm.device()
    optimizer.zero_grad()
    loss_sum = None  # the logged losses cover all passes, not only the last
    for i in range(passes):
        with timer.phase("data_s"):
            images, targets = next(batches)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
        with timer.phase("forward_s"), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), \
                forward_module(optimizer, model, last=i == passes - 1) as module:
            loss_dict = module(images, targets)
        with timer.phase("backward_allreduce_s"):
            mean = check_losses(loss_dict, step, lr, stop)
            loss_sum = mean if loss_sum is None else loss_sum + mean
            if agvm is not None:
                agvm.before_backward(step)  # local gradients, before Horovod replaces them by means
            # Horovod sums the passes' gradients locally and averages over ranks: divide by passes.
            scaler.scale(sum(loss_dict.values()) / passes).backward()
    with timer.phase("backward_allreduce_s"):
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is not None:
            synchronize()  # wait for the averaged gradients: clipping and AGVM must see the global ones
    with timer.phase("optimizer_s"):
        apply_gradients(optimizer, model, scaler, step, lr, agvm, clip_grad_norm)
    timer.step()
    return dict(zip(loss_dict, (loss_sum / passes).tolist(), strict=True))


def forward_module(optimizer, model: torch.nn.Module, last: bool = True):
    """A context giving the module a pass's forward calls: the model itself, whose parameters' hooks
    Horovod's optimizer averages through; or, for an optimizer with ``forward_pass`` (comm.gradients
    ddp), DistributedDataParallel's wrapper of it, which must see the forward to average in backward
    and accumulates locally on all passes but the ``last`` (Horovod's backward_passes_per_step)."""
    forward_pass = getattr(optimizer, "forward_pass", None)
    return contextlib.nullcontext(model) if forward_pass is None else forward_pass(last)


def check_losses(loss_dict: dict, step: int, lr: float, stop=None) -> torch.Tensor:
    """The losses averaged over ranks; raises DivergenceError on every rank if any is not finite.

    Collective, before backward: the mean over ranks is non-finite on every rank when any rank's
    loss is, so all ranks stop here together; a rank that stopped alone would leave the others
    waiting forever in the gradient allreduce. One more element carries ``stop.requested`` (a
    preemption signal on this rank) to every rank, at no extra collective.
    """
    values = [v.detach().float() for v in loss_dict.values()]
    flag = float(stop is not None and stop.requested)
    both = comm.allreduce_small(torch.stack([*values, torch.tensor(flag, device=values[0].device)]),
                                op="mean", name="hvdet.losses")
    mean = both[:-1]
    if stop is not None and both[-1].item() > 0:
        stop.agreed = True
    if not torch.isfinite(mean).all():
        raise DivergenceError(f"diverged at iteration {step + 1} (lr {lr:.6g}): loss "
                              f"{dict(zip(loss_dict, mean.tolist(), strict=True))}")
    return mean


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

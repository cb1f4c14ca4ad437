"""Cross-GPU Batch Normalization (MegDet, Algorithm 1): BN statistics over a group of ranks.

MegDet (Peng et al., CVPR 2018) normalizes each BN layer with the statistics of all images on a
group of GPUs ("BN size", 32 images was best) instead of the 2 images one GPU holds. Per rank i
of a group, over its images and pixels, for every channel:

    s_i = sum x,  n_i = count                       # (1) local sums
    mu = sum_i s_i / sum_i n_i                      # (2) allreduce over the group
    v_i = sum (x - mu)^2                            # (3) local squared deviations from the GROUP mean
    sigma^2 = sum_i v_i / sum_i n_i                 # (4) allreduce over the group
    y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta   # (5) normalize

The backward pass is that of BatchNorm over the whole group's batch. With x_hat = (x - mu) * invstd
and n = sum_i n_i, it needs two group sums, gathered in one more allreduce:

    dx = gamma * invstd * (dy - sum_g(dy) / n - x_hat * sum_g(dy * x_hat) / n)
    dgamma_i = sum_i(dy * x_hat),  dbeta_i = sum_i(dy)    # LOCAL: the gradient allreduce sums them

Statistics in ONE collective (``stats="chan"``, the default on GPUs): each rank computes its count n_i,
mean m_i and M2_i = sum (x - m_i)^2 (exact: deviations from its own mean), the group allgathers
the (n_i, m_i, M2_i), and every rank merges them with Chan, Golub and LeVeque's formula:

    n = sum n_i,  mu = sum n_i m_i / n,  sigma^2 = (sum M2_i + sum n_i (m_i - mu)^2) / n

This is MegDet's exact variance with half its forward latency (one collective instead of steps
(2) and (4)). ``stats="two_pass"`` is Algorithm 1 as written (two collectives; the default on CPUs,
where Chan's was not faster in benchmarks/bn_overhead.py: a shared-memory collective takes 10-15 us
there, see docs/cross_gpu_bn.md; ``stats="auto"`` picks per device); ``stats="one_pass"``
sends (sum x, sum x^2, count) and takes E[x^2] - mu^2: one collective, but it cancels
catastrophically when |mu| >> sigma.

Edge cases: a rank may hold no elements (n_i = 0): it sends zeros and still takes part in every
collective, so it never hangs the others; a group with no element at all (or a single value per
channel) raises on every rank, as torch's BatchNorm does. fp16/bf16 input accumulates in fp32 and
the collectives carry fp64. Running mean / unbiased running variance follow torch's BatchNorm;
eval mode uses the running statistics and never communicates.

The local arithmetic (moments, backward reductions, input gradient) is in :mod:`hvdet.ops.bn`:
torch references, and Triton kernels on CUDA; ``impl`` picks one ("auto": the fastest that takes
the tensor).

Every rank of a group must run the same layers in the same order (forward and backward): each
training forward is one collective (``chan``, ``one_pass``) or two (``two_pass``), each backward one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from hvdet import comm
from hvdet.ops import bn as ops
from hvdet.registry import BN_STATS

BACKENDS = ("auto", *comm.GROUP_BACKENDS)
STATS = BN_STATS  # the recipe's bn.stats choices: one tuple, so config and the layer cannot disagree
_DIMS = ops.DIMS  # everything but the channel


def resolve_stats(stats: str, x: torch.Tensor) -> str:
    """``auto``: ``chan`` for CUDA tensors (one collective, four Triton launches per layer), MegDet's
    ``two_pass`` on CPU (Chan's was not faster there, see the module docstring)."""
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    if stats == "auto":
        return "chan" if x.is_cuda else "two_pass"
    return stats


def bn_group_size(bn_size_images: int, images_per_gpu: int, world_size: int) -> int:
    """Ranks per BN group for MegDet's "BN size" (images per statistic): bn_size / images_per_gpu."""
    if images_per_gpu < 1 or bn_size_images < 1:
        raise ValueError(f"BN size ({bn_size_images}) and images per GPU ({images_per_gpu}) must be >= 1")
    if bn_size_images % images_per_gpu:
        raise ValueError(f"BN size {bn_size_images} images is not a multiple of {images_per_gpu} images per GPU")
    group_size = bn_size_images // images_per_gpu
    if world_size % group_size:
        raise ValueError(f"BN size {bn_size_images} images = {group_size} ranks of {images_per_gpu} images, "
                         f"which does not divide the world of {world_size} ranks "
                         f"(use a BN size of {images_per_gpu} x a divisor of {world_size})")
    return group_size


def group_moments(x: torch.Tensor, group: comm.Group, backend: str = "auto", stats: str = "auto",
                  impl: str = "auto", running: tuple | None = None, stat_dtype: torch.dtype | None = None):
    """Mean and biased variance per channel (``stat_dtype``, default the accumulation dtype), and the
    element count (a float64 tensor of one element: reading it on the host would stall a GPU), over
    ``group``. ``running`` = (running_mean, running_var, factor): updated in place (torch's convention).

    Steps (1)-(4) of Algorithm 1, in one collective (``chan``, ``one_pass``) or two (``two_pass``).
    Collective: every rank of the group must call it.
    """
    stats = resolve_stats(stats, x)
    acc = ops.acc_dtype(x)
    stat_dtype = stat_dtype or acc
    running_mean, running_var, factor = running or (None, None, 0.0)
    if stats == "chan":
        how = ops.resolve(x, impl)
        # The one sync point of the forward: every rank's packed (n_i, m_i, M2_i), merged by Chan's formula.
        parts = group.allgather(ops.moments_packed(x, how), backend)
        if parts.device.type == "cpu":  # raise before the running statistics move (free on the CPU)
            _check_count(parts[:, :1].sum(0))
            return ops.group_stats(parts, stat_dtype, running_mean, running_var, factor, how)
        mean, var, n = ops.group_stats(parts, stat_dtype, running_mean, running_var, factor, how)
        return mean, var, _check_count(n)  # on the device: no host sync
    xa = x.to(acc)
    n_local = float(x.numel() // x.shape[1])
    s = xa.sum(_DIMS).double()                                           # s_i
    count = s.new_full((1,), n_local)                                    # n_i
    if stats == "one_pass":
        ss = xa.square().sum(_DIMS).double()                             # sum x^2
        total = group.allreduce(torch.cat([s, ss, count]), "sum", backend)
        n = _check_count(total[-1:])
        mean = total[: s.numel()] / n
        var = (total[s.numel():-1] / n - mean.square()).clamp_(min=0.0)  # E[x^2] - mu^2
    else:
        # Sync point 1: the group mean; every rank needs it before its squared deviations.
        total = group.allreduce(torch.cat([s, count]), "sum", backend)
        n = _check_count(total[-1:])
        mean = total[:-1] / n                                            # mu
        v = (xa - mean.to(acc)[None, :, None, None]).square_().sum(_DIMS).double()   # v_i
        # Sync point 2: the group variance (exact two-pass: no cancellation).
        var = group.allreduce(v, "sum", backend) / n                     # sigma^2
    if running_mean is not None:
        ops.update_running(running_mean, running_var, factor, mean, var * (n / (n - 1)))
    return mean.to(acc).to(stat_dtype), var.to(acc).to(stat_dtype), n


def _check_count(n: torch.Tensor) -> torch.Tensor:
    # The count is the group's, the same on every rank: all raise together, none hangs.
    msg = "CrossGPUBatchNorm2d: expected more than 1 value per channel in the BN group, got {} " \
          "(does every rank of the group hold an empty batch?)"
    if n.device.type != "cpu":
        torch._assert_async(n[0] > 1, msg.format("fewer"))  # checked on the device: no host sync
    elif n[0].item() < 2:
        raise ValueError(msg.format(int(n[0].item())))
    return n


class _CrossGPUBatchNormFn(torch.autograd.Function):
    """Training-mode CGBN with the exact group backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, group, backend, stats, impl):
        stat_dtype = weight.dtype if weight is not None else ops.acc_dtype(x)
        running = (running_mean, running_var, factor) if running_mean is not None else None
        mean, var, n = group_moments(x, group, backend, stats, impl, running, stat_dtype)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.n, ctx.group, ctx.backend, ctx.impl = eps, n, group, backend, impl
        # Step (5): torch's own fused kernel (cuDNN on GPU) with the group statistics as running ones.
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var = ctx.saved_tensors
        param_dtype = weight.dtype if weight is not None else mean.dtype
        local, dw, db = ops.grad_sums(dy, x, mean, var, ctx.eps, param_dtype, ctx.impl)
        # Sync point 3: dx depends on every rank's dy through mu and sigma. Always called, even when
        # this rank needs no dx, so the ranks of a group stay in lockstep.
        total = ctx.group.allreduce(local, "sum", ctx.backend)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ops.input_grad_from_sums(dy, x, total, ctx.n, weight, mean, var, ctx.eps, ctx.impl)
        return (dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None, None)


class CrossGPUBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover ``group_size`` consecutive ranks (MegDet CGBN).

    ``group_size``: ranks sharing statistics (None: all ranks); it must divide the world size.
    ``backend``: the group collective, ``auto`` (the fastest measured, see ``comm.AUTO_ORDER``),
    ``shm`` (shared memory between the ranks of one host, CPU), ``torch`` (NCCL on GPU, Gloo on
    CPU), ``mpi`` (mpi4py, under mpirun) or ``horovod``.
    ``stats``: ``auto`` (chan on GPUs, two_pass on CPUs), ``chan`` (exact, one collective), ``two_pass``
    (exact, MegDet's two) or ``one_pass``
    (E[x^2] - mu^2, one collective, inexact for |mean| >> std). ``impl``: the local arithmetic's
    implementation (:mod:`hvdet.ops.bn`).
    A group of one rank is plain BatchNorm2d (cuDNN on GPU), unless ``force_group_path`` is set: then
    it runs CGBN's own arithmetic with a group of one, which is how tests and benchmarks/gpu_check.py
    check and time that arithmetic on one GPU. Subclassing BatchNorm2d keeps the state_dict keys and
    ``isinstance`` checks (weight-decay rules, freezing) of the layer it replaces.
    """

    force_group_path = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group_size: int | None = None, backend: str = "auto",
                 stats: str = "auto", impl: str = "auto", device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if backend not in BACKENDS:
            raise ValueError(f"CrossGPUBatchNorm2d: backend must be one of {BACKENDS}, got {backend!r}")
        if stats not in STATS:
            raise ValueError(f"CrossGPUBatchNorm2d: stats must be one of {STATS}, got {stats!r}")
        if impl not in ops.IMPLS:
            raise ValueError(f"CrossGPUBatchNorm2d: impl must be one of {ops.IMPLS}, got {impl!r}")
        self.group_size = group_size
        self.backend = backend
        self.stats = stats
        self.impl = impl
        if comm.is_initialized():
            self._group()  # a bad group size fails here, where the layer is built

    def _group(self) -> comm.Group:
        try:
            return comm.consecutive_groups(self.group_size)  # cached: a dict look-up after the first call
        except ValueError as err:
            raise ValueError(f"CrossGPUBatchNorm2d(group_size={self.group_size}): {err}") from None

    def _factor(self) -> float:
        """torch's exponential average factor (momentum, or 1/t for momentum=None), counting this batch."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            # Running statistics (or, without them, this rank's batch, as torch's SyncBatchNorm does):
            # no communication in eval mode.
            use_batch = self.running_mean is None
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                use_batch, 0.0, self.eps)
        group = self._group()
        factor = self._factor()
        if group.size == 1 and not self.force_group_path:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, factor, self.eps)
        return _CrossGPUBatchNormFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                          factor, self.eps, group, self.backend, self.stats, self.impl)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_size={self.group_size}, backend={self.backend}, stats={self.stats}, "
                f"impl={self.impl}")


def convert_cross_gpu_bn(module: nn.Module, group_size: int | None = None, backend: str = "auto",
                         stats: str = "auto", impl: str = "auto") -> nn.Module:
    """Replace every BatchNorm2d and torchvision FrozenBatchNorm2d in ``module`` by CrossGPUBatchNorm2d.

    Statistics and affine parameters are copied; a frozen layer's affine becomes trainable (that is
    the point of converting it). Returns the converted module (a new one if ``module`` itself is a BN).
    """
    if isinstance(module, CrossGPUBatchNorm2d):
        return module
    if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        return _from_bn(module, group_size, backend, stats, impl)
    for name, child in module.named_children():
        new = convert_cross_gpu_bn(child, group_size, backend, stats, impl)
        if new is not child:
            setattr(module, name, new)
    return module


def _from_bn(bn: nn.Module, group_size, backend, stats, impl) -> CrossGPUBatchNorm2d:
    frozen = isinstance(bn, FrozenBatchNorm2d)
    ref = next(iter(bn.state_dict().values()), torch.empty(0))  # for the device and dtype
    new = CrossGPUBatchNorm2d(
        bn.weight.numel() if frozen else bn.num_features, eps=bn.eps, momentum=0.1 if frozen else bn.momentum,
        affine=frozen or bn.affine, track_running_stats=frozen or bn.track_running_stats,
        group_size=group_size, backend=backend, stats=stats, impl=impl, device=ref.device,
        dtype=ref.dtype if ref.is_floating_point() else None)
    with torch.no_grad():
        if new.affine and bn.weight is not None:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
            if not frozen:
                new.weight.requires_grad_(bn.weight.requires_grad)
                new.bias.requires_grad_(bn.bias.requires_grad)
        if new.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            if not frozen:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)

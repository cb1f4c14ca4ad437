"""Cross-GPU BN's local arithmetic: references (torch ops, any device) and faster implementations.

For x of shape [N, C, H, W] and per channel c (statistics in fp32, fp64 for fp64 input):

* :func:`moments`: this rank's count n_i, mean m_i and M2_i = sum (x - m_i)^2; exact (the
  deviations are taken from the rank's own mean, then merged across ranks with Chan's formula,
  :func:`merge_moments`).
* :func:`backward_reduce`: sum(dy) and sum(dy * (x - mean)) for the group's mean.
* :func:`input_grad`: dx = a dy + b x + c with per-channel a, b, c (the BN input gradient).

and the same steps in the packed forms Cross-GPU BN exchanges, which the Triton implementation
fuses into four launches per layer (see :mod:`hvdet.ops.bn_triton`): :func:`moments_packed` (float64
n_i, m_i, M2_i), :func:`group_stats` (merge of the group's parts, running statistics updated),
:func:`grad_sums` (float64 sum dy, sum dy x_hat; local dgamma, dbeta), :func:`input_grad_from_sums`.

``impl``: ``reference`` (torch ops), ``aten`` (backward_reduce only, CPU only: the reductions of
torch's eval-mode ``native_batch_norm_backward``, one fused pass; its CUDA kernel asserts on the
arguments this uses, so it is never chosen for CUDA tensors), ``triton`` (:mod:`hvdet.ops.bn_triton`;
CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``) and ``auto`` (triton for CUDA tensors,
aten/reference on CPU).
"""
from __future__ import annotations

import torch

from hvdet.ops.triton_support import acc_dtype, runs_on

IMPLS = ("auto", "reference", "aten", "triton")
DIMS = (0, 2, 3)  # everything but the channel


def _triton():
    from hvdet.ops import bn_triton
    return bn_triton


def choose(x: torch.Tensor, impl: str, op: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if x.is_cuda and runs_on(x) and _triton().accepts(x):
            return "triton"
        return "aten" if op == "backward_reduce" and x.device.type == "cpu" else "reference"
    if impl == "triton" and not (runs_on(x) and _triton().accepts(x)):
        raise ValueError(f"impl='triton' cannot take a {tuple(x.shape)} {x.dtype} tensor on {x.device} "
                         "(CUDA, or CPU under TRITON_INTERPRET=1; NCHW or NHWC)")
    if impl == "aten" and (op != "backward_reduce" or x.device.type != "cpu"):
        raise ValueError(f"impl='aten' is the CPU backward reduction only, not {op} on {x.device}")
    return impl


def moments(x: torch.Tensor, impl: str = "auto") -> tuple[float, torch.Tensor, torch.Tensor]:
    """(n_i, mean_i [C], M2_i [C]) of this rank's x; n_i a Python float, zeros for an empty x."""
    n = float(x.numel() // x.shape[1])
    acc = acc_dtype(x)
    if n == 0:
        zeros = torch.zeros(x.shape[1], device=x.device, dtype=acc)
        return 0.0, zeros, zeros.clone()
    if choose(x, impl, "moments") == "triton":
        local = _triton().local_moments_packed(x)
        c = x.shape[1]
        return n, local[1:c + 1].to(acc), local[c + 1:].to(acc)
    # Two local passes (the sum, then squared deviations from this rank's mean): as cheap as MegDet's
    # two-pass arithmetic on CPU, where torch.var_mean's Welford kernel took 3.3x as long
    # (benchmarks/bn_overhead.py, ResNet-50's 53 layers: 80 ms against 24 ms a step).
    xa = x.to(acc)
    mean = xa.sum(DIMS) / n
    return n, mean, (xa - mean.view(1, -1, 1, 1)).square_().sum(DIMS)  # M2_i = sum (x - m_i)^2


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Chan, Golub, LeVeque (1979): the (n, mean, M2) of the union of parts, exactly.

    counts [P, 1] (or [P, C]), means and m2s [P, C]:
        n = sum n_i,  mu = sum n_i m_i / n,  M2 = sum M2_i + sum n_i (m_i - mu)^2
    Parts with n_i = 0 contribute nothing. Returns n as [1] (or [C]), mu and M2 as [C].
    """
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n.clamp(min=1)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return n, mean, m2


def backward_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                    impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sum(dy) and sum(dy * x_hat) per channel, x_hat = (x - mean) / sqrt(var + eps), in
    mean's dtype."""
    if x.numel() == 0:
        return mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
    how = choose(x, impl, "backward_reduce")
    if how == "triton":
        packed, _, _ = _triton().grad_sums_packed(dy, x, mean, var, eps, mean.dtype)
        c = mean.numel()
        return packed[:c].to(mean.dtype), packed[c:].to(mean.dtype)
    if how == "aten":
        # torch's eval-mode BN backward computes exactly these two reductions in one fused CPU pass,
        # given our group statistics as the "running" ones.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, None, mean, var, None, None, False, eps, [False, True, True])
        return sum_dy.to(mean.dtype), sum_dy_xhat.to(mean.dtype)
    acc = acc_dtype(x)
    dya = dy.to(acc)
    shape = (1, -1, 1, 1)
    sum_dy_xmu = (dya * (x.to(acc) - mean.to(acc).view(shape))).sum(DIMS)
    invstd = torch.rsqrt(var + eps).to(acc)
    return dya.sum(DIMS).to(mean.dtype), (sum_dy_xmu * invstd).to(mean.dtype)


def input_grad(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """dx = a dy + b x + c per channel (a, b, c of shape [C]), in x's dtype. The Triton form computes a, b,
    c inside its kernel: :func:`input_grad_from_sums`."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"input_grad has the reference implementation only, got impl={impl!r} "
                         "(Triton's is input_grad_from_sums)")
    acc = acc_dtype(x)
    shape = (1, -1, 1, 1)
    # In place on x * b: an out-of-place addcmul onto the broadcast (1, C, 1, 1) term took torch's slow
    # path on CPU (2-3x slower at ResNet-50's shapes, benchmarks/bn_overhead.py's arithmetic table).
    dx = (x.to(acc) * b.to(acc).view(shape)).add_(c.to(acc).view(shape))
    return dx.addcmul_(dy.to(acc), a.to(acc).view(shape)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The packed forms Cross-GPU BN exchanges (fused into few launches by the Triton implementation)
# ---------------------------------------------------------------------------------------------

def resolve(x: torch.Tensor, impl: str) -> str:
    """triton or reference: the implementation of the packed steps for tensors like x."""
    if impl == "aten":  # the CPU backward reduction only; the other steps take the reference
        return "reference"
    return "triton" if choose(x, impl, "moments") == "triton" else "reference"


def moments_packed(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """This rank's float64 [2C + 1] = (n_i, mean_i[C], M2_i[C]); zeros (n_i = 0) for an empty x."""
    if x.numel() and resolve(x, impl) == "triton":
        return _triton().local_moments_packed(x)
    n, mean, m2 = moments(x, "reference")
    return torch.cat([mean.new_full((1,), n), mean, m2]).double()


def group_stats(parts: torch.Tensor, stat_dtype: torch.dtype, running_mean=None, running_var=None,
                factor: float = 0.0, impl: str = "reference"):
    """Mean and biased variance (``stat_dtype``) and count n (float64 [1]) of the group's packed
    parts [G, 2C + 1] (Chan's merge); the running statistics, when given, move by ``factor`` towards
    the mean and the unbiased variance. ``impl``: as :func:`resolve` chose for the input."""
    if impl == "triton":
        return _triton().group_stats(parts, stat_dtype, running_mean, running_var, factor)
    c = (parts.shape[1] - 1) // 2
    n, mean, m2 = merge_moments(parts[:, :1], parts[:, 1:c + 1], parts[:, c + 1:])
    var = m2 / n.clamp(min=1)
    if running_mean is not None:
        update_running(running_mean, running_var, factor, mean, m2 / (n - 1).clamp(min=1))
    return mean.to(stat_dtype), var.to(stat_dtype), n


@torch.no_grad()
def update_running(running_mean, running_var, factor: float, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """torch's BatchNorm convention: running = (1 - factor) running + factor batch, with the unbiased
    batch variance."""
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased_var.to(running_var.dtype), alpha=factor)


def grad_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
              param_dtype: torch.dtype, impl: str = "auto"):
    """(float64 [2C] = (sum dy, sum dy x_hat), dgamma, dbeta): this rank's sums, to be allreduced, and
    its local parameter gradients (Horovod's gradient allreduce sums those)."""
    if x.numel() and resolve(x, impl) == "triton":
        return _triton().grad_sums_packed(dy, x, mean, var, eps, param_dtype)
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, var, eps, impl)
    return torch.cat([sum_dy, sum_dy_xhat]).double(), sum_dy_xhat.to(param_dtype), sum_dy.to(param_dtype)


def input_grad_from_sums(dy: torch.Tensor, x: torch.Tensor, total: torch.Tensor, n: torch.Tensor, weight,
                         mean: torch.Tensor, var: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """dx = gamma invstd (dy - mean_g(dy) - x_hat mean_g(dy x_hat)) from the group sums ``total``."""
    if x.numel() and resolve(x, impl) == "triton":
        return _triton().input_grad(dy, x, total, n, weight, mean, var, eps)
    c = mean.numel()
    n = n.to(total.device)
    mean_dy, mean_dy_xhat = (total[:c] / n).to(mean.dtype), (total[c:] / n).to(mean.dtype)
    invstd = torch.rsqrt(var + eps)
    a = invstd if weight is None else weight * invstd
    b = -a * invstd * mean_dy_xhat
    c = -a * mean_dy - b * mean
    return input_grad(dy, x, a, b, c, "reference")

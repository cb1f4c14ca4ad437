"""Cross-GPU BN's local arithmetic: references (torch ops, any device) and faster implementations.

For x of shape [N, C, H, W] and per channel c (statistics in fp32, fp64 for fp64 input):

* :func:`moments`: this rank's count n_i, mean m_i and M2_i = sum (x - m_i)^2; exact (the
  deviations are taken from the rank's own mean, then merged across ranks with Chan's formula,
  :func:`merge_moments`).
* :func:`backward_reduce`: sum(dy) and sum(dy * (x - mean)) for the group's mean.
* :func:`input_grad`: dx = a dy + b x + c with per-channel a, b, c (the BN input gradient).

``impl``: ``reference`` (torch ops), ``aten`` (backward_reduce only, CPU only: the reductions of
torch's eval-mode ``native_batch_norm_backward``, one fused pass; its CUDA kernel asserts on the
arguments this uses, so it is never chosen for CUDA tensors), ``triton`` (:mod:`hvdet.ops.bn_triton`;
CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``) and ``auto`` (triton for CUDA tensors,
aten/reference on CPU).
"""
from __future__ import annotations

import torch

from hvdet.ops.triton_support import runs_on

IMPLS = ("auto", "reference", "aten", "triton")
DIMS = (0, 2, 3)  # everything but the channel


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
        counts, means, m2s = _triton().moments_partials(x)
        _, mean, m2 = merge_moments(counts[:, :1].double(), means.double(), m2s.double())
        return n, mean.to(acc), m2.to(acc)
    var, mean = torch.var_mean(x.to(acc), DIMS, correction=0)
    return n, mean, var * n                                              # M2_i = n_i * biased var


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
    invstd = torch.rsqrt(var + eps)
    if how == "triton":
        sum_dy, sum_dy_xmu = _triton().backward_reduce(dy, x, mean)
        return sum_dy.to(mean.dtype), (sum_dy_xmu * invstd).to(mean.dtype)
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
    return dya.sum(DIMS).to(mean.dtype), (sum_dy_xmu * invstd.to(acc)).to(mean.dtype)


def input_grad(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """dx = a dy + b x + c per channel (a, b, c of shape [C]), in x's dtype."""
    if x.numel() and choose(x, impl, "input_grad") == "triton":
        return _triton().input_grad(dy, x, a, b, c)
    acc = acc_dtype(x)
    shape = (1, -1, 1, 1)
    # In place on x * b: an out-of-place addcmul onto the broadcast (1, C, 1, 1) term took torch's slow
    # path on CPU (2-3x slower at ResNet-50's shapes, benchmarks/bn_overhead.py's arithmetic table).
    dx = (x.to(acc) * b.to(acc).view(shape)).add_(c.to(acc).view(shape))
    return dx.addcmul_(dy.to(acc), a.to(acc).view(shape)).to(x.dtype)

"""The (PMD-)LAMB multi-tensor update: the torch reference and the choice among implementations.

One call updates every parameter tensor of an optimizer. Per tensor it takes a row of
coefficients (:data:`COEFS`), so param groups with different lr, weight decay, betas or trust
flags, and tensors at different steps of the PMD cycle, all go through the same call:

    m_t = c.beta1 m + c.one_minus_beta1 g s          # beta1 already multiplied by xi_t (PMD-LAMB)
    v_t = c.beta2 v + c.one_minus_beta2 (g s)^2
    u_t = m_t c.bias_corr1 / (sqrt(v_t c.bias_corr2) + c.eps) + c.weight_decay x
    x  <- x - c.step_size phi u_t,   phi = ||x|| / ||u_t|| if c.trust and both norms > 0, else 1

where s is the gradient-clipping factor. Implementations (``impl``):

* ``reference``: ``torch._foreach_*`` ops; any device and dtype. The oracle of the others, and the
  fallback. On CPU each foreach op is another pass over memory.
* ``cpp``: :mod:`hvdet.ops.lamb_cpp`, contiguous fp32 CPU tensors, two passes (40 B/param).
* ``triton``: :mod:`hvdet.ops.lamb_triton`, fp32 CUDA params with fp32/bf16/fp16 gradients, three
  launches for all tensors (40 B/param), clipping factor read on the device (no host sync).
* ``auto``: per tensor, triton for CUDA tensors it takes, cpp for CPU ones, reference for the rest.

``HVDET_LAMB_IMPL=reference`` forces the reference everywhere (``auto`` then never builds the C++).
"""
from __future__ import annotations

import math
import os

import torch

from hvdet.ops.triton_support import runs_on

# Per-tensor coefficient columns, in the order of the enum in csrc/lamb_cpu.cpp.
COEFS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_corr1", "bias_corr2", "eps",
         "weight_decay", "step_size", "trust")
IMPLS = ("auto", "reference", "cpp", "triton")
# Tensors per L2-sized group for the Triton step (None: all in one group); see lamb_triton.
TRITON_GROUP_ELEMS: int | None = None


def _cpp():
    from hvdet.ops import lamb_cpp  # loads (and may build) the C++ kernel on first use only
    return lamb_cpp


def _triton():
    from hvdet.ops import lamb_triton
    return lamb_triton


def choose(quad: tuple, impl: str = "auto") -> str:
    """The implementation that updates one (param, grad, exp_avg, exp_avg_sq) quadruple."""
    return _decide(_resolve(impl), quad)


def _resolve(impl: str) -> str:
    """``impl`` checked, with ``HVDET_LAMB_IMPL`` applied to ``auto``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    forced = os.environ.get("HVDET_LAMB_IMPL", "auto")
    return forced if impl == "auto" else impl


def _decide(impl: str, quad: tuple) -> str:
    # auto: Triton for CUDA tensors only (under TRITON_INTERPRET=1 it could take CPU ones, slowly).
    if (impl == "triton" or impl == "auto" and quad[0].is_cuda) and runs_on(quad[0]) and _triton().accepts(quad):
        return "triton"
    if impl in ("auto", "cpp") and _cpp().accepts(quad):
        if _cpp().kernel_available():
            return "cpp"
        if impl == "cpp":
            raise RuntimeError("the fused LAMB C++ kernel is unavailable: "
                               f"{_cpp()._kernel_error or 'disabled by HVDET_LAMB_IMPL=reference'}")
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl={impl!r} does not take a {quad[0].dtype} param with a {quad[1].dtype} gradient "
                         f"on {quad[0].device} (contiguous: {all(t.is_contiguous() for t in quad)}); use 'auto'")
    return "reference"


def lamb_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, coefs: torch.Tensor,
              grad_scale: float | torch.Tensor = 1.0, impl: str = "auto") -> torch.Tensor:
    """Update every tensor in place; returns float64 [n, 2]: ||x|| (before) and ||u|| per tensor.

    ``coefs`` is a float64 CPU tensor [n, len(COEFS)]; gradients are multiplied by ``grad_scale``
    (global-norm clipping) as they are read: a float, or a one-element tensor on the gradients'
    device, which the Triton step reads there (a NaN skips the step) and the others read on the host
    (a non-finite one raises FloatingPointError).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n) or tuple(coefs.shape) != (n, len(COEFS)):
        raise ValueError(f"lamb_step: {n} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
                         f"{len(exp_avg_sqs)} exp_avg_sqs and coefs of shape {tuple(coefs.shape)} do not match")
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    parts = _plan(params, grads, exp_avgs, exp_avg_sqs, _resolve(impl))
    results = []
    for (how, *_), (ids, triton_plan) in parts.items():
        sub = [[t[i] for i in ids] for t in (params, grads, exp_avgs, exp_avg_sqs)] if how != "triton" else None
        rows = coefs if len(ids) == n else coefs[torch.tensor(ids)].contiguous()
        if how == "triton":
            results.append(triton_plan.run(rows, grad_scale))
        else:
            scale = _host_scale(grad_scale)
            results.append(_cpp().step(*sub, rows, scale) if how == "cpp" else reference_step(*sub, rows, scale))
    if len(parts) == 1:
        return results[0]  # stays on its device: no host sync on CUDA
    norms = torch.zeros(n, 2, dtype=torch.float64)
    for (ids, _), result in zip(parts.values(), results, strict=True):
        norms[torch.tensor(ids)] = result.cpu()
    return norms


_PLANS: dict = {}  # the last few steps' partitions, by every tensor's address


def _plan(params, grads, exp_avgs, exp_avg_sqs, impl: str) -> dict:
    """{(impl, device, dtypes): (tensor indices, Triton plan or None)}: which implementation updates which
    tensors. Kept while every address and gradient dtype stays the same, which is step after step for
    an optimizer: its Python cost is then a few tuples, not a check of every tensor."""
    key = (impl, TRITON_GROUP_ELEMS, tuple(t.data_ptr() for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts),
           tuple(g.dtype for g in grads), tuple(p.numel() for p in params))
    if key in _PLANS:
        return _PLANS[key]
    parts: dict[tuple, list[int]] = {}
    for i, quad in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        how = _decide(impl, quad)
        # One call per implementation, device and dtype pair: foreach ops and kernels need one of each.
        parts.setdefault((how, params[i].device, params[i].dtype, grads[i].dtype), []).append(i)
    plans = {}
    for part, ids in parts.items():
        quads = [[t[i] for i in ids] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        plans[part] = (ids, _triton().Plan(*quads, TRITON_GROUP_ELEMS) if part[0] == "triton" else None)
    if len(_PLANS) >= 8:  # a handful of optimizers (or address sets) at a time
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plans
    return plans


def prepare(params, impl: str = "auto") -> None:
    """Load (building it once if need be) the C++ kernel that ``impl`` will use for CPU ``params``, so
    that no first step pays for it (a build took minutes inside a timed run)."""
    if _resolve(impl) in ("auto", "cpp") and any(p.device.type == "cpu" for p in params):
        _cpp().kernel_available()


def _host_scale(grad_scale) -> float:
    scale = float(grad_scale)
    if not math.isfinite(scale):
        raise FloatingPointError(f"LAMB: the gradient clipping factor is {scale} (a NaN or inf gradient norm)")
    return scale


def reference_step(params, grads, exp_avgs, exp_avg_sqs, coefs, grad_scale: float = 1.0) -> torch.Tensor:
    """The update with torch._foreach ops (one device and dtype): the oracle of the kernels."""
    device = params[0].device
    b1, omb1, b2, omb2, bc1, bc2, eps, wd, _, _ = coefs.t().tolist()  # host floats: no device traffic
    on_device = coefs.to(device, non_blocking=True)
    step_size, use_trust = on_device[:, COEFS.index("step_size")], on_device[:, COEFS.index("trust")] != 0
    g = ([gr.to(p.dtype) for gr, p in zip(grads, params, strict=True)] if grads[0].dtype != params[0].dtype
         else list(grads))
    if grad_scale != 1.0:
        g = torch._foreach_mul(g, grad_scale)
    torch._foreach_mul_(exp_avgs, b1)                              # xi beta1 m_{t-1}
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, omb1))     # m_t
    torch._foreach_mul_(exp_avg_sqs, b2)                           # xi beta2 v_{t-1}
    torch._foreach_addcmul_(exp_avg_sqs, g, g, omb2)               # v_t
    denom = torch._foreach_sqrt(torch._foreach_mul(exp_avg_sqs, bc2))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(exp_avgs, bc1)
    torch._foreach_div_(update, denom)                             # r_t
    torch._foreach_add_(update, torch._foreach_mul(params, wd))    # u_t = r_t + lambda x_t
    x_norm = torch.stack(torch._foreach_norm(params)).double()
    u_norm = torch.stack(torch._foreach_norm(update)).double()
    phi = torch.where(use_trust & (x_norm > 0) & (u_norm > 0), x_norm / u_norm, torch.ones_like(x_norm))
    # Per-tensor step sizes stay on the device (0-d tensors): no host sync on CUDA.
    steps = (-step_size * phi).to(params[0].dtype)
    torch._foreach_mul_(update, list(steps.unbind()))
    torch._foreach_add_(params, update)                            # x_{t+1} = x_t - lr alpha phi u_t
    return torch.stack([x_norm, u_norm], dim=1)


def grad_norm(grads: list) -> torch.Tensor:
    """||g|| over all tensors as a float64 0-d tensor: on the gradients' device when they share one
    (no host sync), else on the CPU. Apex FusedLAMB's max_grad_norm clips by this."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    squares = [torch.stack(torch._foreach_norm(gs)).double().square().sum() for gs in by_device.values()]
    total = squares[0] if len(squares) == 1 else sum(s.cpu() for s in squares)
    return total.sqrt()

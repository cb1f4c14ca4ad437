"""PMD-LAMB (LargeDet, Algorithm 1) and LAMB, with a fused multi-tensor step."""
from __future__ import annotations

import math

import torch


def _ops():
    from hvdet.ops import lamb as ops_lamb
    return ops_lamb


def pmd_decay(step: int, cycle_length: int | None) -> float:
    """xi_t = cos(pi/2 * (t mod T) / T) (LargeDet Eq. 3); 1 for every t when T is None (LAMB)."""
    if cycle_length is None:
        return 1.0
    return math.cos(math.pi / 2 * (step % cycle_length) / cycle_length)


class PMDLAMB(torch.optim.Optimizer):
    r"""Periodical Moments Decay LAMB (LargeDet, ECCV 2020, Algorithm 1), per parameter tensor x:

        xi  = cos(pi/2 * (t mod T) / T)                  # Eq. 3, t = this tensor's step, from 1
        m_t = xi * beta1 * m_{t-1} + (1 - beta1) * g_t   # Eq. 4
        v_t = xi * beta2 * v_{t-1} + (1 - beta2) * g_t^2 # Eq. 5
        r_t = m_t / (sqrt(v_t) + eps)
        u_t = r_t + lambda * x_t
        x_{t+1} = x_t - lr * alpha * phi * u_t,   phi = ||x_t|| / ||u_t||

    Edge cases: phi = 1 when ||x_t|| or ||u_t|| is 0 (a zero-initialized bias, an all-zero update),
    and for param groups with ``trust=False`` (norm and bias parameters, as in Apex's FusedLAMB,
    which skips the trust ratio where weight decay is off). ``cycle_length=None`` is LAMB (xi = 1).
    ``bias_correction=True`` divides m_t by 1 - beta1^t and v_t by 1 - beta2^t (Apex). ``max_grad_norm``
    clips by the global gradient norm first: g *= max_norm / max(||g||, max_norm) (Apex).

    Per-group keys: lr, betas, eps, weight_decay, alpha, cycle_length, bias_correction, trust,
    lr_scale (set by AGVM, applied by :func:`hvdet.optim.schedules.set_lr`), max_grad_norm and
    impl. Every option lives in the param groups, not on the object, because Horovod's
    DistributedOptimizer re-creates the optimizer from ``param_groups`` alone.

    State (m, v, step) is created when the optimizer is, not at the first step: Horovod's
    ``broadcast_optimizer_state`` would otherwise take a zero-gradient step to create it, and with
    weight decay that step moves every parameter.

    The step is fused (see :mod:`hvdet.ops.lamb`): one C++ call for all fp32 CPU tensors (two passes
    over memory), three Triton launches for all CUDA tensors, the torch._foreach reference elsewhere;
    ``impl`` = "auto" | "cpp" | "triton" | "reference". On CUDA the clipping factor stays on the
    device: a non-finite gradient norm then skips the step there (counted in ``nonfinite_steps``, a
    device tensor) instead of raising, which would need a host sync every step.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 5e-4,
                 alpha: float = 0.012, cycle_length: int | None = 200, bias_correction: bool = False,
                 max_grad_norm: float | None = None, impl: str = "auto"):
        _check(lr >= 0, f"lr must be >= 0, got {lr}")
        _check(all(0.0 <= b < 1.0 for b in betas) and len(betas) == 2,
               f"betas must be two values in [0, 1), got {betas}")
        _check(eps >= 0, f"eps must be >= 0, got {eps}")
        _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        _check(alpha > 0, f"alpha must be > 0, got {alpha}")
        _check(cycle_length is None or (isinstance(cycle_length, int) and cycle_length >= 1),
               f"cycle_length must be a positive int or None (LAMB), got {cycle_length!r}")
        _check(max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        _check(impl in _ops().IMPLS, f"impl must be one of {_ops().IMPLS}, got {impl!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "alpha": alpha,
                    "cycle_length": cycle_length, "bias_correction": bias_correction, "trust": True, "lr_scale": 1.0,
                    "max_grad_norm": max_grad_norm, "impl": impl}
        super().__init__(params, defaults)
        _ops().prepare([p for g in self.param_groups for p in g["params"]], impl)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._state_of(p)

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # Contiguous moments whatever the parameter's memory format: the kernel reads them flat.
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            return loss
        if any(p.grad.is_sparse for _, ps in groups for p in ps):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for _, ps in groups for p in ps]
        grad_scale = self._clip_scale(grads)  # before any state changes: it may raise
        impls = {g.get("impl", "auto") for g in self.param_groups}
        if len(impls) > 1:
            raise ValueError(f"one fused step serves every param group, so impl must be the same in all; "
                             f"got {sorted(impls)}")
        params, exp_avgs, exp_avg_sqs, rows, all_states = [], [], [], [], []
        for group, with_grad in groups:
            states = [self._state_of(p) for p in with_grad]
            params += with_grad
            exp_avgs += [s["exp_avg"] for s in states]
            exp_avg_sqs += [s["exp_avg_sq"] for s in states]
            rows.append(_coef_rows(group, [s["step"] + 1 for s in states]))  # t counts from 1
            all_states += states
        norms = _ops().lamb_step(params, grads, exp_avgs, exp_avg_sqs, torch.cat(rows), grad_scale, impls.pop())
        for state in all_states:  # only once the step was taken: a kernel error leaves t unchanged
            state["step"] += 1
        self.last_norms = norms  # ||x_t||, ||u_t|| per updated tensor, for diagnostics
        return loss

    def _clip_scale(self, grads: list) -> float | torch.Tensor:
        limits = {g["max_grad_norm"] for g in self.param_groups}
        if len(limits) > 1:
            raise ValueError(f"max_grad_norm clips by the global gradient norm, so it must be the same in every "
                             f"param group; got {sorted(limits, key=str)}")
        max_norm = limits.pop()
        if max_norm is None:
            return 1.0
        norm = _ops().grad_norm(grads)
        if norm.is_cuda:
            # Stays on the device: the Triton step reads it there, and a NaN factor (a non-finite norm)
            # makes it skip the step; the other implementations read it on the host and raise.
            finite = torch.isfinite(norm)
            self.nonfinite_steps = getattr(self, "nonfinite_steps", 0) + (~finite).long()
            return torch.where(finite, max_norm / norm.clamp(min=max_norm), torch.full_like(norm, math.nan))
        total = float(norm)
        if not math.isfinite(total):
            step = next(iter(self.state.values()), {}).get("step", 0) + 1
            raise FloatingPointError(f"{type(self).__name__} step {step}: the global gradient norm is {total} "
                                     "(a NaN or inf gradient); the step was not taken")
        return max_norm / max(total, max_norm)


def _coef_rows(group: dict, steps: list[int]) -> torch.Tensor:
    """float64 [len(steps), len(COEFS)]: one row of hvdet.ops.lamb.COEFS per tensor. Tensors at the same
    step share a row, and usually all of a group's are: then it is one row, expanded."""
    beta1, beta2 = group["betas"]
    step_size = group["lr"] * group["alpha"]
    distinct = sorted(set(steps))
    table = []
    for t in distinct:
        xi = pmd_decay(t, group["cycle_length"])
        bc1 = 1.0 / (1.0 - beta1 ** t) if group["bias_correction"] else 1.0
        bc2 = 1.0 / (1.0 - beta2 ** t) if group["bias_correction"] else 1.0
        table.append((xi * beta1, 1.0 - beta1, xi * beta2, 1.0 - beta2, bc1, bc2, group["eps"],
                      group["weight_decay"], step_size, 1.0 if group["trust"] else 0.0))
    table = torch.tensor(table, dtype=torch.float64)
    if len(distinct) == 1:
        return table.expand(len(steps), -1)
    where = {t: i for i, t in enumerate(distinct)}
    return table[torch.tensor([where[t] for t in steps])]


class LAMB(PMDLAMB):
    """LAMB (You et al. 2020) in the LargeDet form: PMD-LAMB with ``cycle_length=None`` (xi = 1).

    ``alpha`` scales the trust ratio as in LargeDet (default 0.012, the value both of its LAMB and
    PMD-LAMB runs use); ``alpha=1`` is the LAMB paper's update.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 5e-4,
                 alpha: float = 0.012, bias_correction: bool = False, max_grad_norm: float | None = None,
                 impl: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                         cycle_length=None, bias_correction=bias_correction, max_grad_norm=max_grad_norm,
                         impl=impl)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

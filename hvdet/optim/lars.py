"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017) with momentum."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    r"""SGD with momentum and a layer-wise trust ratio (LARS, You et al. 2017, Algorithm 1):

        local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)   # eta: trust_coefficient, beta: weight_decay
        v_t = m * v_{t-1} + lr * local_lr * (g + beta * w)      # m: momentum
        w  -= v_t

    Edge cases: local_lr = 1 when ||w|| or ||g|| is 0, and for param groups with ``trust=False``
    (norm and bias parameters: the usual exclusion, with their own weight decay, usually 0), which
    makes those plain SGD with momentum. Momentum buffers are created with the optimizer, so
    Horovod's ``broadcast_optimizer_state`` has state to send and takes no zero-gradient step.
    Multi-tensor (``torch._foreach_*``) ops; LARS is the baseline here, not the tuned path.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient), ("eps", eps)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "trust": True, "lr_scale": 1.0}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._buffer(p)

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list) -> None:
        grads = [p.grad for p in params]
        bufs = [self._buffer(p) for p in params]
        wd, eta = group["weight_decay"], group["trust_coefficient"]
        if group["trust"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = eta * w_norm / (g_norm + wd * w_norm + group["eps"])
            local_lr = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        else:
            local_lr = torch.ones(len(params), device=params[0].device)
        scale = list((group["lr"] * local_lr).to(params[0].dtype).unbind())
        update = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]  # g + beta w
        torch._foreach_mul_(update, scale)                     # lr * local_lr * (g + beta w)
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, update)                      # v_t
        torch._foreach_sub_(params, bufs)                      # w -= v_t

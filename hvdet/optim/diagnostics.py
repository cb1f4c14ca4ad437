"""Large-batch diagnostics the papers plot, cheap enough to log every N iterations.

* :func:`trust_ratios`: ||w|| / ||g|| per parameter tensor (LargeDet Fig. 3: the spread across
  layers is why one global lr fails at large batch). Two multi-tensor norm calls and one copy to
  the host, so a few milliseconds for a ResNet-50 FPN.
* per-module gradient variance: :attr:`hvdet.optim.AGVM.last_variances` (it needs the two
  half-world gradient means, which only AGVM's due iterations compute).
"""
from __future__ import annotations

import statistics

import torch

from hvdet.optim.build import ModuleMap


def trust_ratios(model: torch.nn.Module) -> dict[str, float]:
    """{parameter name: ||w|| / ||g||} for every parameter with a gradient; inf where ||g|| is 0.

    Call it after the gradients are averaged (after ``synchronize()``) and before ``step()``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return {}
    by_device: dict = {}
    for n, p in named:
        by_device.setdefault(p.device, []).append((n, p))
    ratios = {}
    for items in by_device.values():
        params = [p.detach() for _, p in items]
        grads = [p.grad.detach() for _, p in items]
        w_norm = torch.stack(torch._foreach_norm(params)).double()
        g_norm = torch.stack(torch._foreach_norm(grads)).double()
        ratio = torch.where(g_norm > 0, w_norm / g_norm, torch.full_like(w_norm, float("inf")))
        ratios.update(zip((n for n, _ in items), ratio.tolist(), strict=True))
    return ratios


def summarize_by_module(values: dict[str, float], modules: ModuleMap) -> dict[str, dict[str, float]]:
    """{module: {"min", "median", "max"}} of per-parameter values (e.g. :func:`trust_ratios`),
    the compact form to put in a metrics record; ``modules``: the model family's map."""
    by_module: dict[str, list[float]] = {}
    for name, value in values.items():
        by_module.setdefault(modules.module_of(name), []).append(value)
    return {m: {"min": min(v), "median": statistics.median(v), "max": max(v)} for m, v in by_module.items()}

"""Parameter groups for torchvision detectors and the optimizer factory."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from hvdet.registry import OPTIMIZERS

_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile name prefixes


@dataclass(frozen=True)
class ModuleMap:
    """Which module of a model each parameter belongs to, by name prefix (the first match wins; a
    parameter no prefix matches is "other"), and the modules' ``order`` (AGVM's per-module parameter
    groups, the diagnostics). A model family declares its own (:mod:`hvdet.models`): the optimizer
    knows no model's attribute names."""

    prefixes: tuple[tuple[str, str], ...]
    order: tuple[str, ...]

    def __post_init__(self):
        unlisted = {m for _, m in self.prefixes} - set(self.order)
        if unlisted or "other" in self.order:
            raise ValueError(f"ModuleMap: order {self.order} must list every module of the prefixes "
                             f"(missing {sorted(unlisted)}) and not 'other' (it comes last by itself)")

    @property
    def modules(self) -> tuple[str, ...]:
        return (*self.order, "other")

    def module_of(self, param_name: str) -> str:
        name = param_name
        while name.startswith(_WRAPPERS):
            name = name.split(".", 1)[1]
        return next((module for prefix, module in self.prefixes if name.startswith(prefix)), "other")


def is_norm_or_bias(name: str, param: torch.Tensor) -> bool:
    """Biases and normalization scales/shifts (every tensor of rank <= 1): their own weight decay
    (``norm_weight_decay``) and, with ``norm_bias_trust=False``, no trust ratio."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: float = 0.0,
                 per_module: bool = False, norm_bias_trust: bool = False,
                 modules: ModuleMap | None = None) -> list[dict]:
    """Trainable parameters split by weight-decay exclusion and, with ``per_module``, by module.

    Each group: "params", "weight_decay", "name", "module", "lr_scale": 1.0 and "trust" (the LAMB
    family's trust ratio: for norm/bias parameters, ``norm_bias_trust``). ``norm_bias_trust=True`` is
    LargeDet's Algorithm 1, which puts every tensor under the trust ratio; False (the default) is Apex
    FusedLAMB's convention, where they take the raw step lr x alpha x m/sqrt(v): about lr x alpha per
    element, 3.2x that in the first steps without bias correction. benchmarks/toy_collapse.py chose
    the default: with bias correction the exclusion kept BN scales positive up to lr 6.4, where the
    trust ratio (relative steps of lr x alpha = 8% a step, compounding) flipped a third of them.
    Names: "default" and "no_decay"; with ``per_module`` (AGVM's groups)
    "<module>" and "<module>.no_decay" for each module of ``modules`` (the model family's
    :class:`ModuleMap`, ``hvdet.models.module_map(arch)``) that has parameters, in its order, and
    "module" says which module a group belongs to ("all" without per_module). Empty groups are left out.
    """
    if per_module and modules is None:
        raise ValueError("per_module=True needs the model's ModuleMap (modules=hvdet.models.module_map(arch))")
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = modules.module_of(name) if per_module else "all"
        buckets.setdefault((module, is_norm_or_bias(name, p)), []).append(p)
    order = modules.modules if per_module else ("all",)
    groups = []
    for module in order:
        for no_decay in (False, True):
            params = buckets.get((module, no_decay))
            if not params:
                continue
            if per_module:
                name = f"{module}.no_decay" if no_decay else module
            else:
                name = "no_decay" if no_decay else "default"
            groups.append({"params": params, "weight_decay": norm_weight_decay if no_decay else weight_decay,
                           "name": name, "module": module, "lr_scale": 1.0,
                           "trust": norm_bias_trust or not no_decay})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, *, momentum: float = 0.9,
                    betas=(0.9, 0.999), eps: float = 1e-6, alpha: float = 0.012, cycle_length: int | None = 200,
                    per_module: bool = False, norm_weight_decay: float = 0.0, norm_bias_trust: bool = False,
                    bias_correction: bool = True, modules: ModuleMap | None = None,
                    **kwargs) -> torch.optim.Optimizer:
    """An optimizer over :func:`param_groups`; ``name`` in :data:`hvdet.registry.OPTIMIZERS`.

    sgd is MegDet's baseline (momentum SGD; pair it with the linear scaling rule and warmup), adamw
    uses PyTorch's fused kernel where the parameters allow it, lamb/pmdlamb are LargeDet's and lars
    is You et al.'s. The optimizer gets those of the hyperparameters above that its constructor
    takes (SGD has no betas, LAMB no cycle) and every ``kwargs`` entry (a recipe's
    ``solver.optimizer_args``, e.g. LARS's ``trust_coefficient``), which it must take.
    """
    groups = param_groups(model, weight_decay, norm_weight_decay, per_module, norm_bias_trust, modules)
    factory = OPTIMIZERS.load(name)
    accepted = inspect.signature(factory).parameters
    common = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "betas": tuple(betas), "eps": eps,
              "alpha": alpha, "cycle_length": cycle_length, "bias_correction": bias_correction}
    unknown = sorted(set(kwargs) - set(accepted) - {"params"})
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no argument {', '.join(unknown)} (solver.optimizer_args); "
                         f"it takes {', '.join(k for k in accepted if k not in ('params', 'self'))}")
    return factory(groups, **{k: v for k, v in common.items() if k in accepted}, **kwargs)


def adamw(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          **kwargs) -> torch.optim.Optimizer:
    """torch.optim.AdamW, with its fused kernel where the parameters allow it."""
    groups = list(params)
    tensors = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
    # The fused kernel takes floating-point tensors on one supported device kind.
    fusable = len({p.device.type for p in tensors}) == 1 and tensors[0].device.type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fusable else {}), **kwargs)

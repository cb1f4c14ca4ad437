"""Parameter groups for torchvision detectors and the optimizer factory."""
from __future__ import annotations

import torch

from hvdet.optim.lamb import LAMB, PMDLAMB
from hvdet.optim.lars import LARS

MODULES = ("backbone", "fpn", "rpn", "roi_box", "roi_mask", "other")
OPTIMIZERS = ("sgd", "adamw", "lamb", "pmdlamb", "lars")
# Name prefixes of torchvision's FasterRCNN / MaskRCNN (first match wins, so fpn precedes backbone).
_PREFIXES = (("backbone.fpn.", "fpn"), ("backbone.", "backbone"), ("rpn.", "rpn"),
             ("roi_heads.box_head.", "roi_box"), ("roi_heads.box_predictor.", "roi_box"),
             ("roi_heads.mask_head.", "roi_mask"), ("roi_heads.mask_predictor.", "roi_mask"))
_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile name prefixes


def module_of(param_name: str) -> str:
    """The detector module a parameter belongs to: backbone | fpn | rpn | roi_box | roi_mask | other."""
    name = param_name
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    for prefix, module in _PREFIXES:
        if name.startswith(prefix):
            return module
    return "other"


def is_norm_or_bias(name: str, param: torch.Tensor) -> bool:
    """Biases and normalization scales/shifts (every tensor of rank <= 1): no weight decay, no trust ratio."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: float = 0.0,
                 per_module: bool = False) -> list[dict]:
    """Trainable parameters split by weight-decay exclusion and, with ``per_module``, by module.

    Each group: "params", "weight_decay", "name", "module", "lr_scale": 1.0 and "trust" (False for
    norm/bias parameters). Names: "default" and "no_decay"; with ``per_module`` (AGVM's groups)
    "<module>" and "<module>.no_decay" for each module of :data:`MODULES` that has parameters, and
    "module" says which module a group belongs to ("all" without per_module). Empty groups are left out.
    """
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = module_of(name) if per_module else "all"
        buckets.setdefault((module, is_norm_or_bias(name, p)), []).append(p)
    order = MODULES if per_module else ("all",)
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
                           "name": name, "module": module, "lr_scale": 1.0, "trust": not no_decay})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, *, momentum: float = 0.9,
                    betas=(0.9, 0.999), eps: float = 1e-6, alpha: float = 0.012, cycle_length: int | None = 200,
                    per_module: bool = False, norm_weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer over :func:`param_groups`; ``name`` in sgd | adamw | lamb | pmdlamb | lars.

    sgd is MegDet's baseline (momentum SGD; pair it with the linear scaling rule and warmup), adamw
    uses PyTorch's fused kernel where the parameters allow it, lamb/pmdlamb are LargeDet's and lars
    is You et al.'s.
    """
    groups = param_groups(model, weight_decay, norm_weight_decay, per_module)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return _adamw(groups, lr, betas, eps, weight_decay)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha)
    if name == "pmdlamb":
        return PMDLAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha,
                       cycle_length=cycle_length)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _adamw(groups: list[dict], lr: float, betas, eps: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # The fused kernel takes floating-point tensors on one supported device kind.
    fusable = len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fusable else {}))

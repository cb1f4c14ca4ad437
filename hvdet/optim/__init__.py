"""Large-batch optimizers for detection: PMD-LAMB and LAMB (fused), LARS, AGVM, schedules.

    from hvdet.optim import build_optimizer, AGVM, step_lr, set_lr
    opt = build_optimizer(model, "pmdlamb", lr=linear_scaled_lr(0.02, 256), weight_decay=5e-4)

See docs/optimizers.md for the algorithms, the fused kernel and its measured speed.
"""
from hvdet.optim.agvm import AGVM
from hvdet.optim.build import (
    OPTIMIZERS,
    ModuleMap,
    build_optimizer,
    param_groups,
)
from hvdet.optim.diagnostics import summarize_by_module, trust_ratios
from hvdet.optim.lamb import LAMB, PMDLAMB, pmd_decay
from hvdet.optim.lars import LARS
from hvdet.optim.schedules import (
    cosine_lr,
    epochs_to_iters,
    linear_scaled_lr,
    scale_iterations,
    set_lr,
    step_lr,
    warmup_factor,
)

__all__ = ["AGVM", "LAMB", "LARS", "OPTIMIZERS", "PMDLAMB", "ModuleMap", "build_optimizer", "cosine_lr",
           "epochs_to_iters", "linear_scaled_lr", "param_groups", "pmd_decay", "scale_iterations",
           "set_lr", "step_lr", "summarize_by_module", "trust_ratios", "warmup_factor"]

"""A recipe's checks across fields (:func:`validate`), after :mod:`hvdet.dataclass_yaml` has checked
each key's name and type: the names of parts against :mod:`hvdet.registry`'s tables, and the
combinations that cannot run (a run length given twice, AGVM with several backward passes, ...).
Each error is one line naming the file (or override) that wrote the key. Torch-free.
"""
from __future__ import annotations

import difflib
import importlib.util

from hvdet import registry, scoring
from hvdet.dataclass_yaml import ConfigError, unknown_key, where

# The allowed values of the keys that name a part: the registries' names, which the builders use.
CHOICES = {
    "model.arch": tuple(registry.ARCHS),
    "model.norm": tuple(registry.NORMS),
    "data.format": tuple(registry.DATASETS),
    "data.augmentation": registry.AUGMENTATIONS,
    "solver.optimizer": tuple(registry.OPTIMIZERS),
    "bn.backend": ("auto", *registry.GROUP_BACKENDS),
    "bn.stats": registry.BN_STATS,
    "bn.impl": registry.BN_IMPLS,
    "solver.lr_scaling": ("linear", "sqrt", "none"),
    "solver.schedule": ("step", "cosine"),
    "solver.amp_dtype": ("float16", "bfloat16"),
    "checkpoint.on_world_size_change": ("rescale", "refuse"),
    "target_metric": ("AP", "AP50", "AP75"),
    "log.mlperf_division": ("open", "closed"),
    "eval.mode": ("sync", "background"),
    "eval.scorer": scoring.CHOICES,
    "comm.gradients": ("horovod", "ddp"),
}
TARGET_KEYS = ("bbox", "segm")



def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg, source: str = "<config>") -> None:
    """Check a :class:`hvdet.config.Config` (which imports this module) across its fields."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where(source, key)}: {key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
    s = cfg.solver
    if (s.max_iters > 0) == (s.max_epochs > 0):
        raise ConfigError(f"{source}: set exactly one of solver.max_iters and solver.max_epochs "
                          f"(got max_iters={s.max_iters}, max_epochs={s.max_epochs})")
    if s.steps and s.step_epochs:
        raise ConfigError(f"{source}: set solver.steps (iterations) or solver.step_epochs, not both")
    if s.max_iters and s.step_epochs or s.max_epochs and s.steps:
        raise ConfigError(f"{source}: give the lr steps in the unit of the run length "
                          "(steps with max_iters, step_epochs with max_epochs)")
    if s.iters_at_batch and s.max_epochs:
        # Epochs already follow the batch; scaling them by iters_at_batch too would count twice.
        raise ConfigError(f"{source}: solver.iters_at_batch rescales solver.max_iters; with solver.max_epochs "
                          "the run length already follows the batch, so leave iters_at_batch unset")
    for key in ("data.images_per_gpu", "solver.reference_batch", "solver.backward_passes_per_step",
                "eval.images_per_gpu", "log.interval"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {_get(cfg, key)}")
    if cfg.elastic.enabled:
        if cfg.elastic.commit_interval < 1:
            raise ConfigError(f"{source}: elastic.commit_interval must be >= 1, got {cfg.elastic.commit_interval}")
        if cfg.agvm.enabled:
            raise ConfigError(f"{source}: elastic.enabled with agvm.enabled is not supported (AGVM's half-world "
                              "groups are fixed when it is built)")
        if cfg.eval.mode == "background":
            raise ConfigError(f"{source}: elastic.enabled with eval.mode=background is not supported (the "
                              "evaluators are per rank; use eval.mode=sync)")
        if cfg.checkpoint.on_world_size_change != "rescale":
            raise ConfigError(f"{source}: elastic.enabled needs checkpoint.on_world_size_change=rescale (the world "
                              "changes while the run goes on)")
    if cfg.comm.gradients == "ddp":
        if cfg.elastic.enabled:
            raise ConfigError(f"{source}: elastic.enabled is Horovod elastic and needs comm.gradients=horovod "
                              "(under torchrun, comm.gradients=ddp, a lost rank ends the job: resume from its "
                              "checkpoint)")
        if cfg.bn.backend in ("horovod", "mpi"):
            needs = "a Horovod world" if cfg.bn.backend == "horovod" else "a job launched by mpirun"
            raise ConfigError(f"{where(source, 'bn.backend')}: bn.backend={cfg.bn.backend} needs "
                              f"comm.gradients=horovod ({needs}); with comm.gradients=ddp use auto, shm or torch")
    if cfg.eval.scorer == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        raise ConfigError(f"{where(source, 'eval.scorer')}: eval.scorer=faster_coco_eval, but faster_coco_eval is "
                          "not installed: pip install faster-coco-eval==1.8.0, or set eval.scorer=auto")
    for sink in ("wandb", "mlflow"):  # the import name is the extra's name
        if getattr(cfg.log, sink) and importlib.util.find_spec(sink) is None:
            raise ConfigError(f"{where(source, f'log.{sink}')}: log.{sink}=true, but {sink} is not installed: "
                              f"pip install -e '.[{sink}]', or set log.{sink}=false")
    if not 0 <= cfg.eval.background_nice <= 19:
        raise ConfigError(f"{source}: eval.background_nice is a niceness in [0, 19], got {cfg.eval.background_nice}")
    if cfg.comm.timeout_s <= 0:
        raise ConfigError(f"{source}: comm.timeout_s must be > 0, got {cfg.comm.timeout_s}")
    for key in ("solver.cycle_epochs", "agvm.interval_epochs", "agvm.time_constant_epochs"):
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{source}: {key} must be > 0 or null, got {_get(cfg, key)}")
    if min(s.warmup_iters, s.warmup_epochs) < 0:
        raise ConfigError(f"{source}: solver.warmup_iters and warmup_epochs must be >= 0")
    if s.base_lr <= 0:
        raise ConfigError(f"{source}: solver.base_lr must be > 0, got {s.base_lr}")
    if s.cuda_graphs:
        _check_cuda_graphs(cfg, source)
    if cfg.agvm.enabled and s.backward_passes_per_step > 1:
        raise ConfigError(f"{source}: agvm.enabled needs solver.backward_passes_per_step=1 (AGVM compares "
                          "one backward pass's gradients across ranks)")
    for key, value in cfg.target.items():
        if key not in TARGET_KEYS:
            raise ConfigError(unknown_key(f"target.{key}", key, TARGET_KEYS, where(source, f"target.{key}")))
        if not 0 < value <= 1:
            raise ConfigError(f"{source}: target.{key} is an AP in (0, 1], got {value}")
        if key not in cfg.eval.iou_types:
            raise ConfigError(f"{source}: target.{key} needs {key!r} in eval.iou_types {cfg.eval.iou_types}")
    if cfg.model.init_skip and not cfg.model.init_from:
        raise ConfigError(f"{where(source, 'model.init_skip')}: model.init_skip {cfg.model.init_skip} only applies "
                          "with model.init_from (the checkpoint to fine-tune from)")
    d = cfg.data
    if len(d.lsj_scale) != 2 or not 0 < d.lsj_scale[0] <= d.lsj_scale[1]:
        raise ConfigError(f"{where(source, 'data.lsj_scale')}: data.lsj_scale is [low, high] with 0 < low <= high, "
                          f"got {d.lsj_scale}")
    if d.augmentation == "lsj" and len(d.min_sizes) > 1:
        raise ConfigError(f"{where(source, 'data.min_sizes')}: data.augmentation=lsj trains at data.max_size with "
                          f"its own scales, not data.min_sizes {d.min_sizes}: give one, the evaluation scale "
                          f"(e.g. [{d.max_size}])")
    if "segm" in cfg.eval.iou_types and not registry.ARCHS[cfg.model.arch].mask:
        raise ConfigError(f"{source}: eval.iou_types has 'segm' but model.arch {cfg.model.arch} has no mask head")


def _check_cuda_graphs(cfg, source: str) -> None:
    """What the backbone's CUDA graphs need (hvdet.models.cuda_graphs says why)."""
    if cfg.solver.backward_passes_per_step > 1:
        raise ConfigError(f"{source}: solver.cuda_graphs needs solver.backward_passes_per_step=1 (a graph's backward "
                          "writes its gradients into the same buffers every pass)")
    if cfg.comm.gradients != "horovod":
        raise ConfigError(f"{source}: solver.cuda_graphs needs comm.gradients=horovod (DistributedDataParallel's "
                          "reducer is not set up for graphed modules here)")
    if cfg.model.norm == "cross_gpu":
        if cfg.bn.backend not in ("auto", "torch"):
            raise ConfigError(f"{where(source, 'bn.backend')}: solver.cuda_graphs with Cross-GPU BN needs a "
                              f"collective a graph can capture: bn.backend torch (NCCL) or auto, not {cfg.bn.backend}")
        if cfg.data.augmentation != "lsj":
            raise ConfigError(f"{source}: solver.cuda_graphs with Cross-GPU BN needs data.augmentation=lsj (every "
                              "rank of a BN group must capture and replay the same input shapes: LSJ's fixed square)")
        if cfg.elastic.enabled:
            raise ConfigError(f"{source}: solver.cuda_graphs with Cross-GPU BN and elastic.enabled is not supported "
                              "(captured collectives belong to the world they were captured in)")

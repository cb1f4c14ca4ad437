"""Run configuration: plain nested dataclasses, loaded from a YAML recipe, with ``key=value`` overrides.

    cfg = load_config("configs/largedet_fast_320.yaml", ["solver.base_lr=0.03", "output_dir=runs/x"])

A recipe is validated against the dataclasses below: an unknown or mistyped key is an error that names
the key, the file and the closest valid key (difflib); a value of the wrong type is an error too. No
registries, no inheritance: a recipe is the whole run.

**Linear scaling rule (MegDet 3.2, Goyal et al.).** A recipe states ``images_per_gpu`` and the
reference point of its learning rate (``solver.base_lr`` at ``solver.reference_batch`` images); the
global batch and the global lr follow from the number of ranks at run time:

    global_batch = images_per_gpu * world_size * backward_passes_per_step
    lr = base_lr * global_batch / reference_batch         (e.g. 0.02 * 320 / 16 = 0.4, LargeDet Table 4)
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and where it came from."""


@dataclass
class ModelConfig:
    arch: str = "fasterrcnn_resnet50_fpn"
    norm: str = "frozen"                      # frozen | local | cross_gpu
    pretrained_backbone: str | None = None    # a local .pth file; nothing is ever downloaded
    trainable_backbone_layers: int = 3
    overrides: dict = field(default_factory=dict)  # torchvision detector kwargs, e.g. rpn_pre_nms_top_n_train


@dataclass
class DataConfig:
    root: str = "data/coco"                   # relative paths below are under root (COCO 2017 layout)
    train_images: str = "train2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_ann: str = "annotations/instances_val2017.json"
    images_per_gpu: int = 2
    num_workers: int = 2
    min_sizes: list[int] = field(default_factory=lambda: [800])   # shorter side; several: multi-scale
    max_size: int = 1333                      # longer side at most; evaluation at max(min_sizes)
    flip_prob: float = 0.5
    aspect_grouping: bool = True


@dataclass
class SolverConfig:
    optimizer: str = "sgd"                    # sgd | adamw | lamb | pmdlamb | lars
    base_lr: float = 0.02                     # lr at reference_batch images: the linear scaling rule's anchor
    reference_batch: int = 16
    lr_scaling: str = "linear"                # linear | none (base_lr is then the global lr)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    alpha: float = 0.012                      # PMD-LAMB's trust-ratio scale (LargeDet Eq. 5)
    cycle_length: int | None = 200            # PMD-LAMB's T; None -> LAMB
    per_module: bool = False                  # one param group per module (AGVM needs it)
    schedule: str = "step"                    # step | cosine
    max_iters: int = 0                        # either max_iters/steps ...
    steps: list[int] = field(default_factory=list)
    iters_at_batch: int | None = None         # iterations above are counted at this global batch and
    #   rescaled to the run's, keeping the epochs constant (LargeDet 4.1); None: as given
    max_epochs: float = 0.0                   # ... or max_epochs/step_epochs, converted with the global batch
    step_epochs: list[float] = field(default_factory=list)
    iterations_scale: float = 1.0             # MegDet's "longer" policy, e.g. 1.4
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_start_factor: float = 0.001
    final_lr: float = 0.0                     # cosine only
    clip_grad_norm: float | None = None
    backward_passes_per_step: int = 1
    fp16_allreduce: bool = False              # Horovod fp16 compression of the gradients
    amp: bool = True                          # mixed precision on CUDA (autocast; GradScaler for float16)
    amp_dtype: str = "float16"                # CUDA autocast dtype: float16 (with loss scaling) | bfloat16
    amp_on_cpu: bool = False                  # bf16 autocast on CPU hosts too (no loss scaling needed)
    channels_last: bool = True                # CUDA only


@dataclass
class BNConfig:
    size_images: int | None = None            # MegDet's "BN size": images per statistic; None: all ranks
    backend: str = "auto"                     # auto | shm | mpi | torch | horovod (hvdet.comm)
    stats: str = "auto"                       # auto (chan on GPU, two_pass on CPU) | chan | two_pass | one_pass
    impl: str = "auto"                        # local arithmetic: auto | reference | triton (hvdet.ops.bn)


@dataclass
class AGVMConfig:
    enabled: bool = False
    interval: int = 10
    start_iter: int = 0
    momentum: float = 0.97
    clamp: list[float] = field(default_factory=lambda: [0.5, 10.0])


@dataclass
class EvalConfig:
    interval: int = 0                         # iterations between evaluations; 0: only at the end
    start: int = 0                            # no periodic evaluation before this iteration
    at_end: bool = True
    images_per_gpu: int = 2
    num_workers: int = 0
    iou_types: list[str] = field(default_factory=lambda: ["bbox"])


@dataclass
class CheckpointConfig:
    interval: int = 0                         # iterations between checkpoints; 0: only at the end
    keep_last: int = 0                        # 0 keeps every periodic checkpoint
    on_world_size_change: str = "rescale"     # rescale (lr by the linear scaling rule) | refuse


@dataclass
class LogConfig:
    interval: int = 20                        # iterations per metrics.jsonl train record
    progress: bool = True                     # tqdm bar on rank 0


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    target: dict[str, float] = field(default_factory=dict)   # e.g. {bbox: 0.366}: stop when reached
    target_metric: str = "AP"                 # AP (COCO's AP@[.5:.95]) or AP50 (the Open Images metric)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    bn: BNConfig = field(default_factory=BNConfig)
    agvm: AGVMConfig = field(default_factory=AGVMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "model.norm": ("frozen", "local", "cross_gpu"),
    "solver.optimizer": ("sgd", "adamw", "lamb", "pmdlamb", "lars"),
    "solver.lr_scaling": ("linear", "none"),
    "solver.schedule": ("step", "cosine"),
    "bn.backend": ("auto", "horovod", "torch", "mpi", "shm"),
    "bn.stats": ("auto", "chan", "two_pass", "one_pass"),
    "bn.impl": ("auto", "reference", "triton"),
    "solver.amp_dtype": ("float16", "bfloat16"),
    "checkpoint.on_world_size_change": ("rescale", "refuse"),
    "target_metric": ("AP", "AP50", "AP75"),
}
TARGET_KEYS = ("bbox", "segm")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe, apply ``key=value`` overrides, validate, return a :class:`Config`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, raw, "", source)
    validate(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as a YAML scalar or flow collection) to a raw recipe dict."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. solver.base_lr=0.1")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse the value {text!r}: {err}") from None
    parts = key.split(".")
    hint = _check_path(parts, f"override {item!r}")
    if hint is not typing.Any:
        value = _check_type(value, hint, key, f"override {item!r}")  # name the override, not the file
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check_path(parts: list[str], where: str):
    """The type a dotted key's value must have; every component must name a field (a free-form
    dict accepts any sub-key, whose value has the dict's value type)."""
    cls = Config
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(_unknown_key(".".join(parts[:i + 1]), part, names, where))
        hint = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(hint):
            cls = hint
        elif i == len(parts) - 1:
            return hint
        elif not _is_dict(hint):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is a {_type_name(hint)}, it has no sub-keys")
        else:
            args = typing.get_args(hint)
            return args[1] if args and i == len(parts) - 2 else typing.Any
    return dict  # a whole section, e.g. solver={...}


def _unknown_key(full_key: str, key: str, names: typing.Iterable[str], where: str) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    if close:
        parent = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        return f"{where}: unknown key {full_key!r}; did you mean '{parent}{close[0]}'?"
    return f"{where}: unknown key {full_key!r} (valid keys here: {', '.join(sorted(names))})"


def _build(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(_unknown_key(prefix + str(key), str(key), names, source))
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value if value is not None else {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check_type(value, hints[key], prefix + key, source)
    return cls(**kwargs)


def _check_type(value, hint, key: str, source: str):
    """``value`` as ``hint`` (int is accepted for float); anything else is a ConfigError."""
    ok, converted = _convert(value, hint)
    if not ok:
        tip = ""
        if isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items()):
            tip = " (YAML needs a space after the colon: {bbox: 0.5})"
        raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__}){tip}")
    return converted


def _convert(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _convert(value, arg)
            if ok:
                return True, out
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return True, float(value)  # PyYAML (YAML 1.1) reads 1e6 or 5e-4, without a dot, as strings
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_convert(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False, None
        items = {k: _convert(v, args[1]) if args else (True, v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    raise TypeError(f"unsupported config type {hint}")


def _is_dict(hint) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)


# ---------------------------------------------------------------------------------------------
# Validation across fields
# ---------------------------------------------------------------------------------------------

def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config, source: str = "<config>") -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: {key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
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
    if s.base_lr <= 0:
        raise ConfigError(f"{source}: solver.base_lr must be > 0, got {s.base_lr}")
    if cfg.agvm.enabled and s.backward_passes_per_step > 1:
        raise ConfigError(f"{source}: agvm.enabled needs solver.backward_passes_per_step=1 (AGVM compares "
                          "one backward pass's gradients across ranks)")
    for key, value in cfg.target.items():
        if key not in TARGET_KEYS:
            raise ConfigError(_unknown_key(f"target.{key}", key, TARGET_KEYS, source))
        if not 0 < value <= 1:
            raise ConfigError(f"{source}: target.{key} is an AP in (0, 1], got {value}")
        if key not in cfg.eval.iou_types:
            raise ConfigError(f"{source}: target.{key} needs {key!r} in eval.iou_types {cfg.eval.iou_types}")
    if "segm" in cfg.eval.iou_types and not cfg.model.arch.startswith("maskrcnn"):
        raise ConfigError(f"{source}: eval.iou_types has 'segm' but model.arch {cfg.model.arch} has no mask head")


# ---------------------------------------------------------------------------------------------
# The linear scaling rule and the run length
# ---------------------------------------------------------------------------------------------

def data_path(cfg: Config, name: str) -> str:
    """``data.<name>`` under ``data.root`` (an absolute path stays as it is)."""
    return os.path.join(cfg.data.root, getattr(cfg.data, name))


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all ranks."""
    return cfg.data.images_per_gpu * world_size * cfg.solver.backward_passes_per_step


def scaled_lr(cfg: Config, world_size: int) -> float:
    """The global lr for this world size: base_lr * global_batch / reference_batch."""
    # Imported here: hvdet.optim needs torch, and reading or checking a config must not.
    from hvdet.optim.schedules import linear_scaled_lr

    if cfg.solver.lr_scaling == "none":
        return cfg.solver.base_lr
    return linear_scaled_lr(cfg.solver.base_lr, global_batch(cfg, world_size), cfg.solver.reference_batch)


def dump(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML: a recipe that reproduces the run (written atomically, as every file
    of a run is)."""
    from hvdet.atomic import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------
# The run for a world size: batch, lr, length
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    world_size: int
    global_batch: int
    lr: float          # peak lr: base_lr * global_batch / reference_batch (linear scaling rule)
    max_iters: int
    steps: list[int]


def plan_run(cfg: Config, world_size: int, dataset_size: int) -> Plan:
    """Global batch, lr and iterations on ``world_size`` ranks (epoch schedules need ``dataset_size``)."""
    # Imported here: loading and validating a config must not need torch or Horovod.
    from hvdet.optim.schedules import epochs_to_iters, scale_iterations

    s, batch = cfg.solver, global_batch(cfg, world_size)
    if s.max_epochs:
        max_iters = epochs_to_iters(s.max_epochs, dataset_size, batch)
        steps = [epochs_to_iters(e, dataset_size, batch) for e in s.step_epochs]
    else:
        max_iters, steps = s.max_iters, list(s.steps)
    if s.iters_at_batch:  # fewer iterations of a larger batch: the same epochs
        max_iters = scale_iterations(max_iters, s.iters_at_batch / batch)
        steps = [scale_iterations(x, s.iters_at_batch / batch) for x in steps]
    if s.iterations_scale != 1.0:  # the "1.4x" policy stretches the whole schedule
        max_iters = scale_iterations(max_iters, s.iterations_scale)
        steps = [scale_iterations(x, s.iterations_scale) for x in steps]
    return Plan(world_size, batch, scaled_lr(cfg, world_size), max_iters, steps)


def lr_at(cfg: Config, plan: Plan, step: int) -> float:
    """The global lr of 0-based iteration ``step``: linear warmup, then step or cosine decay."""
    from hvdet.optim.schedules import cosine_lr, step_lr

    s = cfg.solver
    if s.schedule == "cosine":
        return cosine_lr(step, plan.lr, plan.max_iters, s.warmup_iters, s.warmup_start_factor, s.final_lr)
    return step_lr(step, plan.lr, plan.steps, s.gamma, s.warmup_iters, s.warmup_start_factor)

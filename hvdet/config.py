"""Run configuration: plain nested dataclasses, loaded from a YAML recipe, with ``key=value`` overrides.

    cfg = load_config("configs/largedet_fast_320.yaml", ["solver.base_lr=0.03", "output_dir=runs/x"])

A recipe is validated against the dataclasses below: an unknown or mistyped key is an error that names
the key, the file and the closest valid key (difflib); a value of the wrong type is an error too; a
name (optimizer, architecture, norm, group backend, dataset format) must be one of
:mod:`hvdet.registry`'s, the same tables the builders use. A recipe may inherit from others
(``_base_: other.yaml``, :mod:`hvdet.recipe_base`); the resolved config is the whole run.
Loading and checking a recipe needs neither torch nor Horovod (``hvdet.plan`` turns it into a run's
batch, lr and length).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hvdet import dataclass_yaml, recipe_base
from hvdet.config_checks import CHOICES, TARGET_KEYS, validate
from hvdet.dataclass_yaml import ConfigError, build

__all__ = ["CHOICES", "TARGET_KEYS", "Config", "ConfigError", "apply_override", "data_path", "dump", "from_dict",
           "load_config", "to_dict", "to_yaml", "validate"]


@dataclass
class ModelConfig:
    arch: str = "fasterrcnn_resnet50_fpn"
    norm: str = "frozen"                      # frozen | local | cross_gpu
    pretrained_backbone: str | None = None    # a local .pth file; nothing is ever downloaded
    init_from: str | None = None              # a detector checkpoint or run dir to fine-tune from (hvdet.finetune)
    init_skip: list[str] = field(default_factory=list)  # fnmatch patterns of tensors init_from leaves fresh
    trainable_backbone_layers: int = 3
    overrides: dict = field(default_factory=dict)  # torchvision detector kwargs, e.g. rpn_pre_nms_top_n_train


@dataclass
class DataConfig:
    format: str = "coco"                      # hvdet.registry.DATASETS (the synthetic set is written as COCO)
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
    augmentation: str = "standard"            # standard (min_sizes + flip) | lsj: large-scale jitter to a
    lsj_scale: list[float] = field(default_factory=lambda: [0.1, 2.0])  # max_size square (docs/data.md)
    skip_invalid_boxes: bool = False          # drop (and count) invalid boxes instead of failing on them
    format_args: dict = field(default_factory=dict)  # more dataset-class kwargs, e.g. voc {allow_empty: true}


@dataclass
class SolverConfig:
    optimizer: str = "sgd"                    # sgd | adam | adamw | lamb | pmdlamb | lars (hvdet.registry.OPTIMIZERS)
    optimizer_args: dict = field(default_factory=dict)  # more constructor kwargs, e.g. {trust_coefficient: 0.02}
    base_lr: float = 0.02                     # lr at reference_batch images: the linear scaling rule's anchor
    reference_batch: int = 16
    lr_scaling: str = "linear"                # linear | sqrt (x sqrt(batch / reference)) | none (the global lr)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0            # weight decay of norm scales/shifts and biases
    norm_bias_trust: bool = False             # LAMB family: norm/bias tensors under the trust ratio (Algorithm 1)
    bias_correction: bool = True              #   or Apex's exclusion; Adam's bias correction or Algorithm 1's
    #   none. Both defaults measured: docs/optimizers.md, benchmarks/toy_collapse.py
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    alpha: float = 0.012                      # PMD-LAMB's trust-ratio scale (LargeDet Eq. 5)
    cycle_length: int | None = 200            # PMD-LAMB's T in iterations; None -> LAMB
    cycle_epochs: float | None = None         # ... or in epochs (hvdet.plan converts at the run's batch)
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
    warmup_iters: int = 0                     # linear warmup in iterations at every batch, and/or in epochs
    warmup_epochs: float = 0.0                #   (converted at the run's batch): the longer of the two
    warmup_start_factor: float = 0.001
    final_lr: float = 0.0                     # cosine only
    clip_grad_norm: float | None = None
    backward_passes_per_step: int = 1
    fp16_allreduce: bool = False              # fp16 compression of the gradients (Horovod's, or DDP's fp16 hook)
    amp: bool = True                          # mixed precision on CUDA (autocast; GradScaler for float16)
    amp_dtype: str = "float16"                # CUDA autocast dtype: float16 (with loss scaling) | bfloat16
    amp_on_cpu: bool = False                  # bf16 autocast on CPU hosts too (no loss scaling needed)
    channels_last: bool = True                # CUDA only
    cuda_graphs: bool = False                 # CUDA: the backbone replayed as CUDA graphs, one per input shape
    #   (hvdet.models.cuda_graphs: one backward pass per step; Cross-GPU BN groups need bn.backend torch, lsj)


@dataclass
class BNConfig:
    size_images: int | None = None            # MegDet's "BN size": images per statistic; None: all ranks
    backend: str = "auto"                     # auto | shm | mpi | torch | horovod (hvdet.comm)
    stats: str = "auto"                       # auto (chan on GPU, two_pass on CPU) | chan | two_pass | one_pass
    impl: str = "auto"                        # local arithmetic: auto | reference | triton (hvdet.ops.bn)


@dataclass
class AGVMConfig:
    enabled: bool = False
    interval: int = 10                        # iterations between variance estimates, or in epochs
    interval_epochs: float | None = None
    start_iter: int = 0
    momentum: float = 0.97                    # smoothing of the lr scales, or as a time constant in epochs
    time_constant_epochs: float | None = None  #   (momentum = 1 - interval / it; hvdet.plan.agvm_timing)
    clamp: list[float] = field(default_factory=lambda: [0.5, 10.0])


@dataclass
class EvalConfig:
    interval: int = 0                         # iterations between evaluations; 0: only at the end
    start: int = 0                            # no periodic evaluation before this iteration
    at_end: bool = True
    mode: str = "sync"                        # sync (training waits) | background (hvdet.eval.background)
    background_nice: int = 10                 # background on CPU hosts: niceness the training ranks add to
    #   themselves once their evaluators run, so an evaluation is not slowed by sharing a core (0: equal)
    images_per_gpu: int = 2
    num_workers: int = 0
    iou_types: list[str] = field(default_factory=lambda: ["bbox"])
    scorer: str = "auto"                      # COCOeval by pycocotools | faster_coco_eval (the same metrics);
    #   auto: faster_coco_eval where it imports, else pycocotools (hvdet.scoring)


@dataclass
class CheckpointConfig:
    interval: int = 0                         # iterations between checkpoints; 0: only at the end
    keep_last: int = 0                        # 0 keeps every periodic checkpoint
    on_world_size_change: str = "rescale"     # rescale (lr by the linear scaling rule) | refuse


@dataclass
class CommConfig:
    gradients: str = "horovod"                # horovod (horovodrun/mpirun) | ddp (torchrun: DistributedDataParallel)
    timeout_s: float = 600.0                  # how long any collective waits for a peer before the job ends
    #   (one policy: Horovod's Gloo time-out and stall shutdown, BN group collectives, the watchdog);
    #   it must exceed rank 0's COCO scoring, which the other ranks wait for


@dataclass
class ElasticConfig:
    enabled: bool = False                     # Horovod elastic: horovodrun --min-np/--max-np --host-discovery-script
    commit_interval: int = 10                 # iterations between in-memory commits: the most work a lost rank costs


@dataclass
class LogConfig:
    interval: int = 20                        # iterations per metrics.jsonl train record
    progress: bool = True                     # tqdm bar on rank 0
    diagnostics: bool = True                  # trust ratios per module (+ AGVM's variances) in train records
    tensorboard: bool = True                  # TensorBoard events beside metrics.jsonl (when it is installed)
    wandb: bool = False                       # a Weights & Biases run (the wandb extra; WANDB_MODE=offline works)
    mlflow: bool = False                      # an MLflow run (the mlflow extra)
    project: str = "hvdet"                    # the W&B project and the MLflow experiment
    mlflow_tracking_uri: str = ""             # "": file:<output_dir>/mlruns, a local file store
    mlperf_org: str = "hvdet"                 # mllog.txt's submission_org, _platform ("": N x this device),
    mlperf_platform: str = ""                 #   _division (closed | open) and _benchmark (retinanet, ...; "":
    mlperf_division: str = "open"             #   none, a detector MLPerf does not benchmark today)
    mlperf_benchmark: str = ""


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
    comm: CommConfig = field(default_factory=CommConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe (merged over its ``_base_`` recipes), apply ``key=value`` overrides, validate,
    return a :class:`Config`."""
    raw, sources = recipe_base.load(path)
    for item in overrides:
        apply_override(raw, item)
        sources.wrote(item.partition("=")[0].strip(), f"override {item!r}")
    return from_dict(raw, source=sources)


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = build(Config, raw, "", source)
    validate(cfg, source)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw recipe dict, checked against :class:`Config`."""
    dataclass_yaml.apply_override(raw, item, Config)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config (bases merged, overrides applied) as a recipe: what ``hvdet config show`` prints."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Paths and the resolved recipe
# ---------------------------------------------------------------------------------------------

def data_path(cfg: Config, name: str) -> str:
    """``data.<name>`` under ``data.root`` (an absolute path stays as it is)."""
    return os.path.join(cfg.data.root, getattr(cfg.data, name))


def dump(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML: a recipe that reproduces the run (written atomically, as every file
    of a run is)."""
    from hvdet.atomic import atomic_write

    text = to_yaml(cfg)
    atomic_write(path, lambda f: f.write(text))

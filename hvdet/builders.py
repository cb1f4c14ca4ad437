"""From a recipe to the parts of a run: dataset, detector, optimizer, and the whole :class:`Run`.

Each part is looked up by its recipe name in :mod:`hvdet.registry` (dataset format, architecture,
norm, optimizer, group backend) and built with the recipe's values; :func:`build_run` puts them
together on every rank and continues a checkpoint when asked.
"""
from __future__ import annotations

import inspect
import socket
from pathlib import Path

import torch

from hvdet import checkpoint, comm, finetune
from hvdet.atomic import remove_stale_temps
from hvdet.config import Config, ConfigError, data_path, dump
from hvdet.data.protocol import DetectionDataset
from hvdet.plan import plan_run
from hvdet.registry import ARCHS, DATASETS
from hvdet.run import Run, seed_rank
from hvdet.runlog import METRICS_FILE, MLLOG, RunLogger, read_jsonl
from hvdet.step import StepSettings, grad_scaler


def build_dataset(cfg: Config, train: bool) -> DetectionDataset:
    from hvdet.data import build_transforms

    d = cfg.data
    # Evaluation images are not resized here: the model resizes them and maps boxes back to the
    # original size that COCO's ground truth is in.
    transforms = build_transforms(train, min_sizes=tuple(d.min_sizes), max_size=d.max_size,
                                  flip_prob=d.flip_prob if train else 0.0, augmentation=d.augmentation,
                                  lsj_scale=tuple(d.lsj_scale))
    split = "train" if train else "val"
    images, ann = data_path(cfg, f"{split}_images"), data_path(cfg, f"{split}_ann")
    # (segm scoring reads the masks from the JSON: decoding them for every val image would be wasted)
    with_masks = train and ARCHS[cfg.model.arch].mask
    cls = DATASETS.load(d.format)
    options = set(inspect.signature(cls).parameters) - {"image_dir", "ann_file", "transforms", "with_masks",
                                                        "skip_invalid_boxes"}
    if set(d.format_args) - options:
        raise ConfigError(f"data.format_args {sorted(set(d.format_args) - options)}: not options of data.format "
                          f"{d.format} ({cls.__name__} takes {sorted(options) or 'none'})")
    return cls(images, ann, transforms=transforms, with_masks=with_masks, skip_invalid_boxes=d.skip_invalid_boxes,
               **d.format_args)


def build_model(cfg: Config, num_classes: int, world_size: int, norm: str | None = None) -> torch.nn.Module:
    from hvdet.models import build_detector

    m, d, b, norm = cfg.model, cfg.data, cfg.bn, norm or cfg.model.norm
    # Sizes: the train loader already resized each image to its random scale from data.min_sizes,
    # so the model must not resize again in training (_skip_resize, a GeneralizedRCNNTransform
    # option for training mode only); at evaluation the model resizes to the test scale.
    sizes = {"min_size": max(d.min_sizes), "max_size": d.max_size, "_skip_resize": True}
    group = None  # ranks per BN group (None: all ranks), from MegDet's BN size in images
    if norm == "cross_gpu" and b.size_images:
        from hvdet.nn import bn_group_size

        group = bn_group_size(b.size_images, d.images_per_gpu, world_size)
    model = build_detector(m.arch, num_classes, norm=norm, bn_group_size=group, bn_backend=b.backend,
                           bn_stats=b.stats, bn_impl=b.impl, pretrained_backbone=m.pretrained_backbone,
                           trainable_backbone_layers=m.trainable_backbone_layers, **{**sizes, **m.overrides})
    model = model.to(comm.device())
    if cfg.solver.channels_last and comm.device().type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # tensor cores want NHWC convolutions
    return model


def build_inference_model(cfg: Config, num_classes: int, world_size: int) -> torch.nn.Module:
    """The recipe's detector for evaluation only (``--eval-only``, background evaluators). Inference
    normalizes with the BN running statistics: no cross-GPU group is needed, nor must it fit the ranks
    evaluating; plain BatchNorm2d has CGBN's state_dict keys, so checkpoints load either way."""
    return build_model(cfg, num_classes, world_size, norm="local" if cfg.model.norm == "cross_gpu" else None)


def build_optimizer(cfg: Config, model: torch.nn.Module, lr: float, cycle_length: int | None | str = "recipe"):
    """The recipe's optimizer over ``model``, wrapped by Horovod (or, under ``comm.gradients: ddp``,
    DistributedDataParallel: hvdet.comm.torch_world) to average gradients over the ranks.
    ``cycle_length``: PMD-LAMB's T in iterations (the plan's, when the recipe gives it in epochs);
    "recipe": ``solver.cycle_length`` as written."""
    from hvdet.models import module_map
    from hvdet.optim import build_optimizer as optimizer_over

    s = cfg.solver
    cycle = s.cycle_length if cycle_length == "recipe" else cycle_length
    opt = optimizer_over(model, s.optimizer, lr, s.weight_decay, momentum=s.momentum, betas=tuple(s.betas),
                         eps=s.eps, alpha=s.alpha, cycle_length=cycle, bias_correction=s.bias_correction,
                         per_module=s.per_module or cfg.agvm.enabled, norm_weight_decay=s.norm_weight_decay,
                         norm_bias_trust=s.norm_bias_trust, modules=module_map(cfg.model.arch), **s.optimizer_args)
    return comm.distributed_optimizer(opt, model.named_parameters(),
                                      compression="fp16" if s.fp16_allreduce else "none",
                                      backward_passes_per_step=s.backward_passes_per_step, model=model)


def holds_a_run(output_dir: str) -> str | None:
    """What makes ``output_dir`` a run that a new one must not overwrite (a checkpoint or a logged
    iteration), or None: a run that failed before its first iteration leaves nothing to protect."""
    folder = Path(output_dir)
    if checkpoint.latest(folder) is not None:
        return "checkpoints"
    metrics = folder / METRICS_FILE
    if metrics.is_file() and any(r.get("type") == "train" for r in read_jsonl(metrics)):
        return "metrics.jsonl"
    return None


def build_run(cfg: Config, resume: str | None = None) -> Run:
    """Every part of a training run, identical on every rank; continued from ``resume`` if given."""
    from hvdet.data import TrainLoader
    from hvdet.optim import AGVM

    comm.init(timeout_s=cfg.comm.timeout_s, gradients=cfg.comm.gradients)
    world, rank = comm.size(), comm.rank()
    # Rank 0 looks and tells the others: they must not see the file rank 0 is about to create. (A rank
    # that joins an elastic job late must not start collectives of its own: the rank 0 of an elastic
    # job checks alone, and the committed state reaches every rank by the elastic runner's sync.)
    elastic = cfg.elastic.enabled and comm.elastic_launch()
    used = holds_a_run(cfg.output_dir) if rank == 0 else None
    if not elastic:
        used = comm.broadcast_object(used)
    if used and not resume:
        raise ConfigError(f"output_dir {cfg.output_dir} already holds a run ({used}); continue it with "
                          f"--resume {cfg.output_dir}, or choose another output_dir=...")
    if rank == 0:  # temp files of writes that a killed run left (no write runs now)
        for folder in (Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"):
            remove_stale_temps(folder)
    logger = RunLogger(cfg.output_dir, enabled=comm.is_main_process(), tensorboard=cfg.log.tensorboard,
                       config=cfg)
    logger.mllog(MLLOG.INIT_START)
    state = checkpoint.load(resume) if resume else None  # before the slow set-up: a bad path fails fast
    init = finetune.read(cfg.model.init_from) if cfg.model.init_from and not resume else None
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (rank 0's are broadcast anyway)
    train_set, val_set = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    report_skipped_boxes(logger, {"train": train_set, "val": val_set})
    plan = plan_run(cfg, world, len(train_set))
    model = build_model(cfg, train_set.num_classes, world)
    init_model(cfg, model, init, logger, resume)
    if cfg.solver.cuda_graphs:  # captured at the first training forward of each shape, after every weight load
        from hvdet.models.cuda_graphs import graph_backbone

        graph_backbone(model)
    opt = build_optimizer(cfg, model, plan.lr, plan.cycle_length)
    a = cfg.agvm
    agvm = AGVM(opt, model, plan.agvm_interval, a.start_iter, plan.agvm_momentum, tuple(a.clamp)) if a.enabled else None
    loader = TrainLoader(train_set, cfg.data.images_per_gpu, rank, world, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, aspect_grouping=cfg.data.aspect_grouping)
    settings = StepSettings.from_solver(cfg.solver, comm.device())
    run = Run(cfg, plan, model, opt, loader, val_set, logger, grad_scaler(settings.amp_dtype, settings.device), agvm,
              settings)
    if comm.is_main_process():
        dump(cfg, Path(cfg.output_dir) / "config.yaml")  # the run's resolved recipe, overrides applied
    if state is not None:
        run.load_state_dict(state, str(checkpoint.resolve(resume)))
        logger.truncate_after(run.iteration)  # records after the checkpoint are about to be redone
    else:
        seed_rank(cfg.seed, rank)
    if not elastic:
        report_hosts(logger, run.iteration)
    # Every rank starts from rank 0's weights. A fresh optimizer has no state to send, and Horovod
    # would first create it by a zero-gradient step: weight decay on the weights, a PMD-LAMB step.
    if not elastic:
        comm.broadcast_parameters(model.state_dict(), root_rank=0)
        if opt.state_dict()["state"]:
            comm.broadcast_optimizer_state(opt, root_rank=0)
    return run


def report_hosts(logger: RunLogger, iteration: int) -> None:
    """Where the launcher put the ranks: one line on rank 0 (``4 ranks on 2 hosts: h1 (ranks 0-1),
    h2 (ranks 2-3)``) and a ``hosts`` record in metrics.jsonl at the iteration this start begins
    from (each start of a resumed run has its own). Collective (every rank's hostname): an elastic job
    reports from its state sync instead, where the ranks of each new world meet (hvdet.comm.elastic)."""
    layout: dict[str, list[int]] = {}
    for rank, host in enumerate(comm.allgather_object(socket.gethostname())):
        layout.setdefault(host, []).append(rank)
    if comm.is_main_process() and comm.size() > 1:
        where = ", ".join(f"{host} (ranks {_spans(ranks)})" for host, ranks in layout.items())
        print(f"hvdet: {comm.size()} ranks on {len(layout)} host{'s' * (len(layout) > 1)}: {where}", flush=True)
    logger.log_event("hosts", {"iteration": iteration, "world_size": comm.size(), "hosts": layout})


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None], strict=True):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(spans)


def init_model(cfg: Config, model: torch.nn.Module, init: tuple | None, logger: RunLogger, resume: str | None) -> None:
    """``model.init_from``: the weights :func:`hvdet.finetune.read` read (``init``) into the new model,
    after any ``pretrained_backbone`` (so they win where both load a tensor) and after the Cross-GPU BN
    conversion, which keeps BatchNorm2d's state-dict names. Every rank loads the same file; rank 0 prints
    the report and records it in metrics.jsonl. A resumed run's checkpoint holds all the weights: it wins."""
    if resume and cfg.model.init_from:
        if comm.is_main_process():
            print(f"model.init_from {cfg.model.init_from} not loaded: resuming {resume}, whose checkpoint holds "
                  "all the weights", flush=True)
        return
    if init is None:
        return
    report = finetune.load_into(model, init[1], init[0], cfg.model.init_skip)
    if comm.is_main_process():
        print(report.line(), flush=True)
    logger.log_event("init_from", report.record())


def report_skipped_boxes(logger: RunLogger, datasets: dict) -> None:
    """``data.skip_invalid_boxes``: what each split dropped, one line on rank 0's console and a
    ``skipped_boxes`` record in metrics.jsonl (each start of the run records its own)."""
    from hvdet.data.coco import skipped_boxes_line

    for split, dataset in datasets.items():
        line = skipped_boxes_line(dataset)
        if line is None:
            continue
        if comm.is_main_process():
            print(f"hvdet: {split} set: {line}", flush=True)
        logger.log_event("skipped_boxes", {"iteration": 0, "split": split, "ann_file": str(dataset.ann_file),
                                           **dataset.skipped_boxes})


# ---------------------------------------------------------------------------------------------
# Elastic training: the parts that depend on the world, rebuilt when it changes
# ---------------------------------------------------------------------------------------------

def elastic_bn_group(cfg: Config, world_size: int) -> int | None:
    """Ranks per Cross-GPU BN group in a world of ``world_size``: the recipe's (MegDet's BN size /
    images per GPU) when it divides the world, else the largest group size below it that does (a
    BN size as close to the recipe's as the world allows); None (all ranks) stays None."""
    if not cfg.bn.size_images:
        return None
    wanted = cfg.bn.size_images // cfg.data.images_per_gpu  # a multiple: checked when the run was built
    return max(g for g in range(1, min(wanted, world_size) + 1) if world_size % g == 0)


def rebuild_for_world(run: Run) -> None:
    """After the world changed (Horovod elastic): this rank's loader shard, the plan (global batch =
    images_per_gpu x ranks x passes, lr by the linear scaling rule), BN group sizes, the logger (rank
    0 may be another process now). The committed state is loaded afterwards (Run.load_state_dict
    converts the loader position and the iteration to the new global batch)."""
    from hvdet.data import TrainLoader
    from hvdet.nn import CrossGPUBatchNorm2d

    cfg, world, rank = run.cfg, comm.size(), comm.rank()
    dataset = run.loader.dataset
    run.loader.close()
    run.plan = plan_run(cfg, world, len(dataset))
    run.loader = TrainLoader(dataset, cfg.data.images_per_gpu, rank, world, seed=cfg.seed,
                             num_workers=cfg.data.num_workers, aspect_grouping=cfg.data.aspect_grouping)
    group = elastic_bn_group(cfg, world)
    for m in run.model.modules():
        if isinstance(m, CrossGPUBatchNorm2d):
            m.group_size = group
    if run.logger.enabled != comm.is_main_process():
        run.logger.close()
        run.logger = RunLogger(cfg.output_dir, enabled=comm.is_main_process(), tensorboard=cfg.log.tensorboard,
                               config=cfg)

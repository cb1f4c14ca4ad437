"""Training engine: the large mini-batch loop, periodic evaluation, time-to-accuracy, checkpoints.

    summary = train(load_config("configs/synthetic_demo.yaml"))     # alone, or under horovodrun/mpirun

One iteration on every rank (``images_per_gpu`` images each, ``global_batch`` over all ranks):

1. next batch from the distributed, per-epoch seeded loader                              data_s
2. forward under autocast when AMP is on: the detector's loss dict                      forward_s
3. collective loss check (comm.allreduce_small), then backward of the (AMP-scaled) loss; Horovod
   averages every gradient as soon as it is ready; ``synchronize()`` waits for them     backward_allreduce_s
4. ``apply_gradients``: AGVM (if on) on the still-scaled gradients, unscale, ``set_lr``
   writes lr(t) * lr_scale, clipping of the averaged gradients, ``step()`` inside
   ``skip_synchronize()``                                                               optimizer_s

The lr is a pure function of the iteration (``hvdet.config.lr_at``), so resuming needs only the
iteration. Time-to-accuracy is wall-clock from the start of training (after set-up, MLPerf's
run_start) to the end of the first evaluation that meets ``target``, evaluations included.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hvdet import checkpoint, comm
from hvdet.atomic import atomic_write
from hvdet.config import Config, ConfigError, Plan, data_path, dump, lr_at, plan_run
from hvdet.metrics import MLLOG, RunLogger, StepTimer
from hvdet.optim.schedules import set_lr  # lr * group["lr_scale"] (AGVM) into every group


class DivergenceError(RuntimeError):
    """The loss became NaN/inf: the run failed, as the papers' tables record it ("Failed")."""


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------

def build_dataset(cfg: Config, train: bool):
    from hvdet.data import CocoDetection, build_transforms

    d = cfg.data
    # Evaluation images are not resized here: the model resizes them and maps boxes back to the
    # original size that COCO's ground truth is in.
    transforms = build_transforms(train, min_sizes=tuple(d.min_sizes), max_size=d.max_size,
                                  flip_prob=d.flip_prob if train else 0.0)
    split = "train" if train else "val"
    images, ann = data_path(cfg, f"{split}_images"), data_path(cfg, f"{split}_ann")
    return CocoDetection(images, ann, transforms=transforms, with_masks=train and cfg.model.arch.startswith("maskrcnn"))
    # (segm scoring reads the masks from the JSON: decoding them for every val image would be wasted)


def build_model(cfg: Config, num_classes: int, world_size: int, norm: str | None = None) -> torch.nn.Module:
    from hvdet.models import build_detector

    m, d, norm = cfg.model, cfg.data, norm or cfg.model.norm
    # Sizes: the train loader already resized each image to its random scale from data.min_sizes,
    # so the model must not resize again in training (_skip_resize, a GeneralizedRCNNTransform
    # option for training mode only); at evaluation the model resizes to the test scale.
    sizes = {"min_size": max(d.min_sizes), "max_size": d.max_size, "_skip_resize": True}
    # Cross-GPU BN is converted here rather than by build_detector so that the BN group's backend
    # and one-pass setting apply: plain BatchNorm2d layers first, then MegDet's CGBN in their place.
    model = build_detector(m.arch, num_classes, norm="local" if norm == "cross_gpu" else norm,
                           pretrained_backbone=m.pretrained_backbone,
                           trainable_backbone_layers=m.trainable_backbone_layers, **{**sizes, **m.overrides})
    if norm == "cross_gpu":
        from hvdet.nn import bn_group_size, convert_cross_gpu_bn

        b = cfg.bn  # MegDet's BN size in images -> ranks per BN group (None: all ranks)
        group = bn_group_size(b.size_images, cfg.data.images_per_gpu, world_size) if b.size_images else None
        model = convert_cross_gpu_bn(model, group_size=group, backend=b.backend, stats=b.stats, impl=b.impl)
    model = model.to(comm.device())
    if cfg.solver.channels_last and comm.device().type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # tensor cores want NHWC convolutions
    return model


@dataclass
class Clock:
    """Time-to-accuracy bookkeeping; saved in checkpoints so a resumed run keeps counting."""

    elapsed_offset_s: float = 0.0   # wall-clock of the earlier segments of this run (before a resume)
    train_s: float = 0.0
    eval_s: float = 0.0
    images: int = 0
    best: dict = field(default_factory=dict)
    reached: bool = False
    time_to_target_s: float | None = None
    evaluations: int = 0
    start: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed_s(self) -> float:
        return self.elapsed_offset_s + time.perf_counter() - self.start

    def state(self) -> dict:
        out = asdict(self)
        out.pop("start")
        out["elapsed_offset_s"] = self.elapsed_s()
        return out


@dataclass
class Run:
    cfg: Config
    plan: Plan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer      # Horovod's DistributedOptimizer
    loader: object                        # hvdet.data.TrainLoader
    val_set: object
    logger: RunLogger
    scaler: torch.amp.GradScaler
    agvm: object = None
    clock: Clock = field(default_factory=Clock)
    start_step: int = 0


def setup(cfg: Config, resume: str | None = None) -> Run:
    from hvdet.data import TrainLoader
    from hvdet.optim import AGVM, build_optimizer

    comm.init()
    world, rank = comm.size(), comm.rank()
    # Rank 0 looks and tells the others: they must not see the file rank 0 is about to create.
    used = comm.broadcast_object((Path(cfg.output_dir) / "metrics.jsonl").exists() if rank == 0 else None)
    if used and not resume:
        raise ConfigError(f"output_dir {cfg.output_dir} already holds a run (metrics.jsonl); continue it with "
                          f"--resume {cfg.output_dir}, or choose another output_dir=...")
    logger = RunLogger(cfg.output_dir, enabled=comm.is_main_process())
    logger.mllog(MLLOG.INIT_START)
    state = checkpoint.load(resume) if resume else None  # before the slow set-up: a bad path fails fast
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (rank 0's are broadcast anyway)
    train_set, val_set = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    plan = plan_run(cfg, world, len(train_set))
    model = build_model(cfg, train_set.num_classes, world)
    s, a = cfg.solver, cfg.agvm
    opt = build_optimizer(model, s.optimizer, plan.lr, s.weight_decay, momentum=s.momentum, betas=tuple(s.betas),
                          eps=s.eps, alpha=s.alpha, cycle_length=s.cycle_length,
                          per_module=s.per_module or a.enabled, norm_weight_decay=s.norm_weight_decay)
    opt = comm.distributed_optimizer(opt, model.named_parameters(), compression="fp16" if s.fp16_allreduce else "none",
                                     backward_passes_per_step=s.backward_passes_per_step)
    agvm = AGVM(opt, model, a.interval, a.start_iter, a.momentum, tuple(a.clamp)) if a.enabled else None
    loader = TrainLoader(train_set, cfg.data.images_per_gpu, rank, world, seed=cfg.seed,
                         num_workers=cfg.data.num_workers, aspect_grouping=cfg.data.aspect_grouping)
    scaler = grad_scaler(cfg, comm.device())
    run = Run(cfg, plan, model, opt, loader, val_set, logger, scaler, agvm)
    if comm.is_main_process():
        dump(cfg, Path(cfg.output_dir) / "config.yaml")  # the run's resolved recipe, overrides applied
    if state is not None:
        checkpoint.restore_run(run, state, resume, reseed=seed_rank)
    else:
        seed_rank(cfg.seed, rank)
    # Every rank starts from rank 0's weights. A fresh optimizer has no state to send, and Horovod
    # would first create it by a zero-gradient step: weight decay on the weights, a PMD-LAMB step.
    comm.broadcast_parameters(model.state_dict(), root_rank=0)
    if opt.state_dict()["state"]:
        comm.broadcast_optimizer_state(opt, root_rank=0)
    return run


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run on ``device``, or None for fp32."""
    s = cfg.solver
    if device.type == "cuda":
        return getattr(torch, s.amp_dtype) if s.amp else None
    return torch.bfloat16 if s.amp_on_cpu else None  # CPUs have fast bf16, no fast fp16


def grad_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) is torch.float16)


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank RPN/RoI sampling streams, reproducible for each (seed, rank)."""
    value = seed * 1000 + rank + 1
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: Config, resume: str | None = None) -> dict:
    """Train until ``max_iters`` or until ``target`` is met; return the summary (on every rank)."""
    run = setup(cfg, resume)
    log, plan, clock = run.logger, run.plan, run.clock
    clock.start = time.perf_counter()
    log.mllog(MLLOG.INIT_STOP)
    log.mllog(MLLOG.RUN_START, metadata={"resumed_at": run.start_step})
    for key, value in ((MLLOG.GLOBAL_BATCH_SIZE, plan.global_batch), (MLLOG.OPT_BASE_LR, plan.lr),
                       (MLLOG.OPT_LR_WARMUP_STEPS, cfg.solver.warmup_iters), (MLLOG.MAX_STEPS, plan.max_iters)):
        log.mllog(key, value)
    timer, window = StepTimer(cuda_sync=torch.cuda.is_available()), Window()
    bar = tqdm(total=plan.max_iters, initial=run.start_step, desc="train", dynamic_ncols=True,
               disable=not (comm.is_main_process() and cfg.log.progress))
    iteration = run.start_step
    try:
        for step in range(run.start_step, plan.max_iters):
            iteration, last = step + 1, step + 1 == plan.max_iters
            start = time.perf_counter()
            losses = train_step(run, step, timer)
            window.add(losses, time.perf_counter() - start)
            clock.train_s += time.perf_counter() - start
            clock.images += plan.global_batch
            bar.update(1)
            if iteration % cfg.log.interval == 0 or last:
                record = log_train(run, timer, window, iteration, lr_at(cfg, plan, step))
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}")
                timer.reset()
                window = Window()
            if (cfg.eval.interval and iteration % cfg.eval.interval == 0 and iteration >= cfg.eval.start
                    or last and cfg.eval.at_end):
                evaluate_and_log(run, iteration)
            if clock.reached or last or (cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0):
                checkpoint.save_run(run, iteration)
            if clock.reached:  # decided on metrics broadcast from rank 0: every rank leaves together
                break
    except DivergenceError as err:
        bar.close()
        finish(run, iteration - 1, stop="diverged", failure=str(err))
        raise
    bar.close()
    return finish(run, iteration, stop="target" if clock.reached else "max_iters")


def train_step(run: Run, step: int, timer: StepTimer) -> dict:
    """One optimizer step (``backward_passes_per_step`` batches); returns the rank-averaged losses."""
    cfg, opt, scaler, device = run.cfg, run.optimizer, run.scaler, comm.device()
    passes, lr = cfg.solver.backward_passes_per_step, lr_at(cfg, run.plan, step)
    amp_dtype = autocast_dtype(cfg, device)
    opt.zero_grad()
    loss_sum = None  # the logged losses cover all passes, not only the last
    for _ in range(passes):
        with timer.phase("data_s"):
            images, targets = next(run.loader)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
        with timer.phase("forward_s"), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_dict = run.model(images, targets)
        with timer.phase("backward_allreduce_s"):
            mean = check_losses(loss_dict, step, lr)
            loss_sum = mean if loss_sum is None else loss_sum + mean
            if run.agvm is not None:
                run.agvm.before_backward(step)  # local gradients, before Horovod replaces them by means
            # Horovod sums the passes' gradients locally and averages over ranks: divide by passes.
            scaler.scale(sum(loss_dict.values()) / passes).backward()
    with timer.phase("backward_allreduce_s"):
        opt.synchronize()  # wait for the averaged gradients: clipping and AGVM must see the global ones
    with timer.phase("optimizer_s"):
        apply_gradients(opt, run.model, scaler, step, lr, run.agvm, cfg.solver.clip_grad_norm)
    timer.step()
    return dict(zip(loss_dict, (loss_sum / passes).tolist(), strict=True))


def check_losses(loss_dict: dict, step: int, lr: float) -> torch.Tensor:
    """The losses averaged over ranks; raises DivergenceError on every rank if any is not finite.

    Collective, before backward: the mean over ranks is non-finite on every rank when any rank's
    loss is, so all ranks stop here together; a rank that stopped alone would leave the others
    waiting forever in the gradient allreduce.
    """
    mean = comm.allreduce_small(torch.stack([v.detach().float() for v in loss_dict.values()]),
                                op="mean", name="hvdet.losses")
    if not torch.isfinite(mean).all():
        raise DivergenceError(f"diverged at iteration {step + 1} (lr {lr:.6g}): loss "
                              f"{dict(zip(loss_dict, mean.tolist(), strict=True))}")
    return mean


def apply_gradients(opt, model: torch.nn.Module, scaler: torch.amp.GradScaler, step: int, lr: float,
                    agvm=None, clip_grad_norm: float | None = None) -> None:
    """The optimizer half of a step, after ``opt.synchronize()`` (gradients averaged, still scaled).

    ``opt``: Horovod's DistributedOptimizer (hvdet.comm.distributed_optimizer), or a plain optimizer
    in a world of one.

    The order matters: AGVM compares the world-mean gradients with the ones it captured during
    backward, which were scaled by the AMP loss scale, so it runs BEFORE unscaling (its variances,
    1 - cosine, do not depend on the scale); then unscale, the lr (AGVM's lr_scale applied), clipping
    of the true gradients, and the step, which the scaler skips if a gradient is inf/NaN.
    """
    if agvm is not None:
        agvm.after_synchronize(step)  # collective on due iterations; updates group["lr_scale"]
    scaler.unscale_(opt)
    set_lr(opt, lr)  # after AGVM: its lr_scale multiplies this iteration's lr
    if clip_grad_norm:
        # The same averaged gradients on every rank -> the same clip factor everywhere.
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    skip_sync = getattr(opt, "skip_synchronize", contextlib.nullcontext)
    with skip_sync():  # synchronized by the caller; step() must not allreduce a second time
        scaler.step(opt)
    scaler.update()


@dataclass
class Window:
    """Losses and training time since the last train record (evaluations and checkpoints excluded)."""

    iterations: int = 0
    train_s: float = 0.0
    losses: dict = field(default_factory=dict)

    def add(self, losses: dict, train_s: float) -> None:
        self.iterations += 1
        self.train_s += train_s
        for k, v in losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + v


def log_train(run: Run, timer: StepTimer, window: Window, iteration: int, lr: float) -> dict:
    phases = timer.window(max_over_ranks=("data_s",))  # collective: every rank logs at this iteration
    phases.pop("iterations"), phases.pop("window_s")
    n = max(window.iterations, 1)
    losses = {k: v / n for k, v in window.losses.items()}
    record = {"iteration": iteration, "epoch": run.loader.epoch, "elapsed_s": run.clock.elapsed_s(), "lr": lr,
              "loss": sum(losses.values()), "losses": losses,
              "images_per_s": run.plan.global_batch * n / max(window.train_s, 1e-9), **phases}
    run.logger.log_train(record)
    return record


def evaluate_and_log(run: Run, iteration: int) -> dict:
    clock, log = run.clock, run.logger
    log.mllog(MLLOG.EVAL_START, metadata={"iteration": iteration, "epoch_num": run.loader.epoch})
    metrics, eval_s = run_evaluation(run.model, run.val_set, run.cfg)
    clock.eval_s += eval_s
    clock.evaluations += 1
    key = run.cfg.target_metric
    for kind, values in metrics.items():
        clock.best[kind] = max(clock.best.get(kind, -1.0), values[key])
    if not clock.reached and target_met(run.cfg.target, metrics, key):
        clock.reached, clock.time_to_target_s = True, clock.elapsed_s()
    log.log_eval({"iteration": iteration, "epoch": run.loader.epoch, "elapsed_s": clock.elapsed_s(),
                  "eval_s": eval_s, **metrics})
    log.mllog(MLLOG.EVAL_ACCURACY, metrics.get("bbox", {}).get("AP"),
              metadata={"iteration": iteration, **{f"{k}_AP": v["AP"] for k, v in metrics.items()}})
    log.mllog(MLLOG.EVAL_STOP, metadata={"iteration": iteration})
    return metrics


def finish(run: Run, iterations: int, stop: str, failure: str | None = None) -> dict:
    """summary.json, MLPerf's run_stop and, on rank 0, the report's table and plots."""
    clock, plan, cfg = run.clock, run.plan, run.cfg
    summary = {"target": cfg.target, "reached": clock.reached, "time_to_target_s": clock.time_to_target_s,
               "best": clock.best, "world_size": plan.world_size, "global_batch_size": plan.global_batch,
               "images_per_s": clock.images / clock.train_s if clock.train_s else 0.0,
               "train_s": clock.train_s, "eval_s": clock.eval_s, "elapsed_s": clock.elapsed_s(),
               "iterations": iterations, "max_iters": plan.max_iters, "lr": plan.lr, "stop": stop,
               "evaluations": clock.evaluations, "arch": cfg.model.arch, "norm": cfg.model.norm,
               "optimizer": cfg.solver.optimizer, "images_per_gpu": cfg.data.images_per_gpu}
    if failure:
        summary["failure"] = failure
    ok = clock.reached or (stop == "max_iters" and not cfg.target)
    run.logger.mllog(MLLOG.RUN_STOP, metadata={"status": "success" if ok else "aborted", "iteration": iterations})
    run.logger.write_summary(summary)
    run.logger.close()
    if comm.is_main_process() and stop != "diverged":
        from hvdet.report import load_run, plot_run

        try:
            plot_run(load_run(cfg.output_dir))
        except Exception as err:  # noqa: BLE001 - the run and its summary are done; plots can be redone
            print(f"warning: plots for {cfg.output_dir} failed ({type(err).__name__}: {err}); "
                  f"retry with: python -m hvdet.report {cfg.output_dir}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def run_evaluation(model, dataset, cfg: Config) -> tuple[dict, float]:
    """COCO metrics of ``model`` on ``dataset`` (every rank its shard) and the seconds it took."""
    from hvdet.evaluation import evaluate

    start = time.perf_counter()
    metrics = evaluate(model, dataset, images_per_gpu=cfg.eval.images_per_gpu, num_workers=cfg.eval.num_workers,
                       iou_types=tuple(cfg.eval.iou_types), progress=cfg.log.progress)  # eval mode, then restored
    return metrics, time.perf_counter() - start


def target_met(target: dict, metrics: dict, key: str = "AP") -> bool:
    """Every target reached. The metrics are rank 0's, broadcast: every rank decides the same."""
    return bool(target) and all(metrics.get(k, {}).get(key, -1.0) >= v for k, v in target.items())


def evaluate_checkpoint(cfg: Config, path: str) -> dict:
    """``--eval-only``: COCO metrics of a checkpoint's model, written to ``output_dir/eval.json``."""
    comm.init()
    val_set = build_dataset(cfg, train=False)
    # Inference normalizes with the BN running statistics: no cross-GPU group is needed, nor must it
    # fit the number of ranks evaluating. Plain BatchNorm2d has the same state_dict keys.
    norm = "local" if cfg.model.norm == "cross_gpu" else cfg.model.norm
    model = build_model(cfg, val_set.num_classes, comm.size(), norm=norm)
    path = checkpoint.resolve(path)  # a run directory means its newest checkpoint
    model.load_state_dict(checkpoint.model_state(path))
    metrics, eval_s = run_evaluation(model, val_set, cfg)
    record = {"checkpoint": str(path), "world_size": comm.size(), "eval_s": eval_s, **metrics}
    if comm.is_main_process():
        atomic_write(Path(cfg.output_dir) / "eval.json", lambda f: f.write(json.dumps(record, indent=2) + "\n"))
    return record

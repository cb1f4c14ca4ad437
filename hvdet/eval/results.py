"""A training run's evaluation results: one logging path for both modes, and the target rule.

:mod:`hvdet.eval.evaluators` decides when to evaluate (``eval.mode: sync``: every rank stops training,
infers its shard, rank 0 scores; ``background``: the snapshot goes to :mod:`hvdet.eval.background`
and training goes on); here each result is logged the same way (``metrics.jsonl``'s eval record, with
the ``scorer`` that scored it: ``eval.scorer``, :mod:`hvdet.scoring`; MLPerf events; best and target
bookkeeping) in :func:`record`, so the modes differ only in when a result arrives and what time it
counts at: a sync result at the wall-clock when it is known (evaluations included in time-to-accuracy),
a background one at its snapshot's wall-clock plus its evaluation time (docs/training.md).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hvdet import checkpoint, comm, mlperf, scoring
from hvdet.atomic import atomic_write
from hvdet.builders import build_dataset, build_inference_model
from hvdet.config import Config
from hvdet.run import Run
from hvdet.runlog import MLLOG


def _when(run: Run, iteration: int) -> dict:
    return {"iteration": iteration, MLLOG.EPOCH_NUM: run.loader.epoch, MLLOG.SAMPLES_COUNT: run.clock.images}


def start(run: Run, iteration: int) -> dict:
    """MLPerf's block_stop and eval_start at the evaluated iteration; returns the snapshot's facts."""
    mlperf.block_stop(run.logger, run.clock.images, run.loader.epoch)
    when = _when(run, iteration)
    run.logger.mllog(MLLOG.EVAL_START, metadata=when)
    return {"when": when, "epoch": run.loader.epoch, "elapsed_s": run.clock.elapsed_s()}


def record(run: Run, iteration: int, metrics: dict, eval_s: float, counts_at_s: float, snapshot: dict,
           extra: dict | None = None) -> None:
    """Log one evaluation's result, update best and the target. ``counts_at_s``: the training
    wall-clock this result counts at (time-to-accuracy)."""
    clock, log, key = run.clock, run.logger, run.cfg.target_metric
    clock.eval_s += eval_s
    clock.evaluations += 1
    clock.evaluated_at = max(clock.evaluated_at, iteration)
    for kind, values in metrics.items():
        clock.best[kind] = max(clock.best.get(kind, -1.0), values[key])
    if not clock.reached and target_met(run.cfg.target, metrics, key):
        clock.reached, clock.time_to_target_s = True, counts_at_s
    log.log_eval({"iteration": iteration, "epoch": snapshot["epoch"], "elapsed_s": counts_at_s, "eval_s": eval_s,
                  "scorer": scoring.resolve(run.cfg.eval.scorer), **(extra or {}), **metrics})
    when = snapshot["when"]
    log.mllog(MLLOG.EVAL_ACCURACY, metrics.get("bbox", {}).get(key),
              metadata={**when, **{f"{k}_{key}": v[key] for k, v in metrics.items()}})
    log.mllog(MLLOG.EVAL_STOP, metadata=when)


def evaluate_and_log(run: Run, iteration: int, beat=None) -> dict:
    """The synchronous evaluation of the model now (collective)."""
    snapshot = start(run, iteration)
    metrics, eval_s = run_evaluation(run.model, run.val_set, run.cfg, beat)
    record(run, iteration, metrics, eval_s, run.clock.elapsed_s(), snapshot)
    if not run.clock.reached and iteration < run.plan.max_iters:  # training goes on: the next block
        mlperf.block_start(run.logger, run.clock.images, run.loader.epoch)
    return metrics


def run_evaluation(model, dataset, cfg: Config, beat=None) -> tuple[dict, float]:
    """COCO metrics of ``model`` on ``dataset`` (every rank its shard) and the seconds it took."""
    from hvdet.eval.coco import evaluate

    start = time.perf_counter()
    metrics = evaluate(model, dataset, images_per_gpu=cfg.eval.images_per_gpu, num_workers=cfg.eval.num_workers,
                       iou_types=tuple(cfg.eval.iou_types), progress=cfg.log.progress,
                       heartbeat=beat, scorer=cfg.eval.scorer)  # eval mode, then restored
    return metrics, time.perf_counter() - start


def final_due(run: Run) -> bool:
    """The end of training owes an evaluation: ``eval.at_end`` and none of this iteration yet (also a
    resumed run whose final one failed)."""
    return run.cfg.eval.at_end and run.clock.evaluated_at != run.iteration


def target_met(target: dict, metrics: dict, key: str = "AP") -> bool:
    """Every target reached. The metrics are rank 0's, broadcast: every rank decides the same."""
    return bool(target) and all(metrics.get(k, {}).get(key, -1.0) >= v for k, v in target.items())


def evaluate_checkpoint(cfg: Config, path: str) -> dict:
    """``--eval-only``: COCO metrics of a checkpoint's model, written to ``output_dir/eval.json``."""
    comm.init(timeout_s=cfg.comm.timeout_s, gradients=cfg.comm.gradients)
    val_set = build_dataset(cfg, train=False)
    model = build_inference_model(cfg, val_set.num_classes, comm.size())
    path = checkpoint.resolve(path)  # a run directory means its newest checkpoint
    model.load_state_dict(checkpoint.model_state(path))
    metrics, eval_s = run_evaluation(model, val_set, cfg)
    result = {"checkpoint": str(path), "world_size": comm.size(), "eval_s": eval_s,
              "scorer": scoring.resolve(cfg.eval.scorer), **metrics}
    if comm.is_main_process():
        atomic_write(Path(cfg.output_dir) / "eval.json", lambda f: f.write(json.dumps(result, indent=2) + "\n"))
    return result

"""Training engine: the large mini-batch loop, periodic evaluation, time-to-accuracy, checkpoints.

    summary = train(load_config("configs/synthetic_demo.yaml"))     # alone, or under horovodrun/mpirun

:func:`hvdet.builders.build_run` makes the run's parts; each iteration is :func:`hvdet.step.train_step`
at the lr :func:`hvdet.plan.lr_at` gives (a pure function of the iteration, so resuming needs only
the iteration); this module decides when to log, evaluate, checkpoint and stop. Time-to-accuracy is
wall-clock from the start of training (after set-up, MLPerf's run_start) to the end of the first
evaluation that meets ``target``, evaluations included; with ``eval.mode: background`` a result
counts at its snapshot's time plus its evaluation time (:mod:`hvdet.eval.results`); the engine sees
only :mod:`hvdet.eval.evaluators`' interface, not the mode.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hvdet import checkpoint, comm, mlperf, scoring
from hvdet.builders import build_run
from hvdet.comm.watchdog import Watchdog
from hvdet.config import Config
from hvdet.eval.evaluators import build_evaluator
from hvdet.eval.results import evaluate_checkpoint
from hvdet.plan import lr_at
from hvdet.preempt import StopRequest
from hvdet.run import Run
from hvdet.runlog import MLLOG, StepTimer
from hvdet.step import DivergenceError, train_step

__all__ = ["DivergenceError", "evaluate_checkpoint", "train"]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: Config, resume: str | None = None) -> dict:
    """Train until ``max_iters`` or until ``target`` is met; return the summary (on every rank).

    Nothing is lost at the end: the last checkpoint is written before the final evaluation, and a
    failed evaluation ends the run with a checkpoint of its iteration and ``stop: eval_failed`` (and
    the cause) in summary.json before the error is raised. A preemption signal on any rank
    (:mod:`hvdet.preempt`) ends every rank after the same iteration with a checkpoint and ``stop:
    preempted``. A rank that makes no progress for ``comm.timeout_s`` exits (:mod:`hvdet.comm.watchdog`).
    """
    run = build_run(cfg, resume)
    beats = Path(cfg.output_dir) / ".watchdog"
    with StopRequest() as stop, Watchdog(comm.timeout_s(), comm.rank(), beats) as watchdog:
        try:
            if cfg.elastic.enabled and comm.elastic_launch():
                return _elastic_loop(run, stop, watchdog)
            if cfg.elastic.enabled and comm.is_main_process():
                print("hvdet: elastic.enabled, but not launched by horovodrun --min-np/--max-np: training "
                      "without elastic recovery", flush=True)
            return _loop(run, stop, watchdog)
        except Exception as err:
            stalled = watchdog.explain(err)  # Horovod's "shut down" after a time-out is a stall
            if stalled is err:
                raise
            raise stalled from err


def _elastic_loop(run: Run, stop: StopRequest, watchdog: Watchdog) -> dict:
    """The loop under Horovod elastic: commits every ``elastic.commit_interval`` iterations, and
    after a world change continues from the last commit in the new world (hvdet.comm.elastic)."""
    from hvdet.builders import rebuild_for_world, report_hosts
    from hvdet.comm import elastic

    resets = []

    def load(state: dict) -> None:
        watchdog.beat(f"loading the commit of iteration {state['iteration']}")
        elapsed = run.clock.elapsed_s()
        run.load_state_dict(state, "the last elastic commit")
        if resets:  # time-to-accuracy goes on through the failure and the recovery (lost work included)
            run.clock.elapsed_offset_s = elapsed
        run.logger.truncate_after(run.iteration)  # iterations after the commit are redone
        if state["world_size"] != comm.size():
            run.logger.log_event("world", {"iteration": run.iteration, "world_size": comm.size(),
                                           "previous_world_size": state["world_size"],
                                           "global_batch": run.plan.global_batch, "lr": run.plan.lr})
            if comm.is_main_process():
                print(f"hvdet: the world changed from {state['world_size']} to {comm.size()} ranks; continuing "
                      f"from the commit of iteration {run.iteration} at global batch {run.plan.global_batch}, "
                      f"lr {run.plan.lr:.4g}", flush=True)

    def on_reset() -> None:
        # Progress: Horovod is up in the new world. A survivor may have waited out Gloo's time-out (as
        # long as comm.timeout_s) for a live peer whose Horovod thread died with the lost rank; without
        # this beat its watchdog would end it moments after it recovered.
        watchdog.rank = comm.rank()
        watchdog.beat(f"recovering: the world changed to {comm.size()} ranks")
        resets.append(comm.size())
        rebuild_for_world(run)

    return elastic.run(lambda state: _loop(run, stop, watchdog, state.commit), save=run.state_dict, load=load,
                       on_reset=on_reset, on_sync=lambda: report_hosts(run.logger, run.iteration))


def _loop(run: Run, stop: StopRequest, watchdog: Watchdog, commit=None) -> dict:
    cfg, log, plan, clock = run.cfg, run.logger, run.plan, run.clock
    if run.evaluator is None:  # background: its processes started and ready; set-up, before the clock starts
        run.evaluator = build_evaluator(cfg, watchdog.beat)
    clock.start = time.perf_counter()
    if not log.started:  # once per run, also when an elastic world change calls the loop again
        log.started = True
        mlperf.log_setup(log, cfg, plan, len(run.loader.dataset), len(run.val_set), comm.device())
        log.mllog(MLLOG.INIT_STOP)
        log.mllog(MLLOG.RUN_START, metadata={"resumed_at": run.iteration})
        mlperf.block_start(log, clock.images, run.loader.epoch)
    timer, window = StepTimer(cuda_sync=torch.cuda.is_available()), Window()
    bar = tqdm(total=plan.max_iters, initial=run.iteration, desc="train", dynamic_ncols=True,
               disable=not (comm.is_main_process() and cfg.log.progress))
    beat = watchdog.beat
    try:
        while run.iteration < plan.max_iters and not clock.reached:
            step = run.iteration
            beat(f"in iteration {step + 1}")
            lr = lr_at(cfg, plan, step)
            start = time.perf_counter()
            losses = _train_step(run, step, lr, timer, stop)
            run.iteration = iteration = step + 1
            window.add(losses, time.perf_counter() - start)
            clock.train_s += time.perf_counter() - start
            clock.images += plan.global_batch
            bar.update(1)
            last = iteration == plan.max_iters
            if iteration % cfg.log.interval == 0 or last or stop.agreed:
                record = log_train(run, timer, window, lr)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}")
                timer.reset()
                window = Window()
            periodic = bool(cfg.checkpoint.interval) and iteration % cfg.checkpoint.interval == 0
            checkpointed = last or stop.agreed or periodic
            if checkpointed:
                beat(f"writing the checkpoint of iteration {iteration}")
                save_checkpoint(run)  # before the final evaluation: a failing one loses nothing
            if commit is not None and iteration % cfg.elastic.commit_interval == 0:
                beat(f"committing iteration {iteration}")
                commit()  # in memory; raises HostsUpdatedInterrupt on every rank when the hosts changed
            if stop.agreed:  # every rank agreed at this step's loss check: all leave here together
                bar.close()
                return finish(run, iteration, stop="preempted", failure=f"stopped by {stop.name()} after iteration "
                              f"{iteration}; continue with --resume {cfg.output_dir}")
            due = bool(cfg.eval.interval) and iteration % cfg.eval.interval == 0 and iteration >= cfg.eval.start
            if due or run.evaluator.pending:
                _evaluate_or_stop(run, bar, checkpointed, lambda due=due: run.evaluator.after_iteration(run, due))
                if clock.reached and not last:  # metrics broadcast from rank 0: every rank leaves together
                    save_checkpoint(run)
        if not clock.reached:  # the final evaluation if one is owed, and any outstanding results
            _evaluate_or_stop(run, bar, True, lambda: run.evaluator.finish(run))
    except DivergenceError as err:
        bar.close()
        finish(run, run.iteration, stop="diverged", failure=str(err))
        raise
    except BaseException:
        bar.close()
        raise
    finally:
        if run.evaluator is not None:  # outstanding background evaluations end with the run
            run.evaluator.close()
            run.evaluator = None  # an elastic world change calls the loop again: a new one there
    bar.close()
    return finish(run, run.iteration, stop="target" if clock.reached else "max_iters")


def _train_step(run: Run, step: int, lr: float, timer: StepTimer, stop: StopRequest) -> dict:
    result = train_step(run.model, run.optimizer, run.scaler, run.loader, run.settings, step=step, lr=lr,
                        agvm=run.agvm, timer=timer, stop_requested=stop.requested)
    stop.agreed = stop.agreed or result.stop_agreed  # every rank alike: the vote rode on the loss check
    return result.losses


def _evaluate_or_stop(run: Run, bar, checkpointed: bool, evaluate) -> None:
    """``evaluate()``; on failure keep the work (a checkpoint unless one was just written), record the
    cause in summary.json and re-raise. Every rank raises alike (hvdet.eval.coco tells them)."""
    try:
        evaluate()
    except Exception as err:
        if comm.is_peer_loss(err):  # not the evaluation's fault: elastic recovery or the launcher ends it
            raise
        bar.close()
        if not checkpointed:
            save_checkpoint(run)
        finish(run, run.iteration, stop="eval_failed", failure=f"evaluation at iteration {run.iteration} "
               f"failed: {type(err).__name__}: {err}")
        raise


def save_checkpoint(run: Run) -> Path:
    """``run``'s checkpoint at its iteration (collective; rank 0 writes)."""
    return checkpoint.save_numbered(run.state_dict(), run.cfg.output_dir, run.iteration, run.cfg.checkpoint.keep_last)


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


def log_train(run: Run, timer: StepTimer, window: Window, lr: float) -> dict:
    phases = timer.window(max_over_ranks=("data_s",))  # collective: every rank logs at this iteration
    phases.pop("iterations"), phases.pop("window_s")
    n = max(window.iterations, 1)
    losses = {k: v / n for k, v in window.losses.items()}
    record = {"iteration": run.iteration, "epoch": run.loader.epoch, "elapsed_s": run.clock.elapsed_s(), "lr": lr,
              "loss": sum(losses.values()), "losses": losses,
              "images_per_s": run.plan.global_batch * n / max(window.train_s, 1e-9), **phases}
    if run.cfg.log.diagnostics:
        record.update(diagnostics(run))
    run.logger.log_train(record)
    return record


def diagnostics(run: Run) -> dict:
    """What LargeDet's Fig. 3 and AGVM plot, for the train record: per module, the min / median / max
    over its tensors of the trust ratio ||w|| / ||g|| (the last step's averaged gradients, the weights
    after it; tensors whose gradient is zero are left out), and with AGVM its latest per-module
    gradient variances (from its last due iteration) and lr scales. Local: gradients and weights are
    the same on every rank."""
    from hvdet.models import module_map
    from hvdet.optim import summarize_by_module, trust_ratios

    ratios = {name: r for name, r in trust_ratios(run.model).items() if math.isfinite(r)}
    out = {"trust_ratio": summarize_by_module(ratios, module_map(run.cfg.model.arch))} if ratios else {}
    if run.agvm is not None and run.agvm.last_variances:
        out["agvm_variance"] = dict(run.agvm.last_variances)
        out["agvm_lr_scale"] = dict(run.agvm.scales)
    return out


def finish(run: Run, iterations: int, stop: str, failure: str | None = None) -> dict:
    """summary.json, MLPerf's run_stop and, on rank 0, the report's table and plots."""
    clock, plan, cfg = run.clock, run.plan, run.cfg
    summary = {"target": cfg.target, "reached": clock.reached, "time_to_target_s": clock.time_to_target_s,
               "best": clock.best, "world_size": plan.world_size, "global_batch_size": plan.global_batch,
               "images_per_s": clock.images / clock.train_s if clock.train_s else 0.0,
               "train_s": clock.train_s, "eval_s": clock.eval_s, "elapsed_s": clock.elapsed_s(),
               "iterations": iterations, "max_iters": plan.max_iters, "lr": plan.lr, "stop": stop,
               "evaluations": clock.evaluations, "arch": cfg.model.arch, "norm": cfg.model.norm,
               "optimizer": cfg.solver.optimizer, "images_per_gpu": cfg.data.images_per_gpu,
               "scorer": scoring.resolve(cfg.eval.scorer)}
    if failure:
        summary["failure"] = failure
    ok = clock.reached or (stop == "max_iters" and not cfg.target)
    mlperf.block_stop(run.logger, clock.images, run.loader.epoch)
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

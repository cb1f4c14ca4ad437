"""A training run's evaluator: one interface for ``eval.mode`` sync and background.

The engine knows only this interface, not the modes:

    evaluator = build_evaluator(cfg, heartbeat)   # set-up, before the clock starts
    if due or evaluator.pending:                  # after an iteration (due: an evaluation iteration)
        evaluator.after_iteration(run, due)
    evaluator.finish(run)                         # training ended: the final evaluation, outstanding results
    evaluator.close()

Every call is collective where the mode's work is (all ranks call it at the same iterations) and
raises on every rank alike when an evaluation fails; what then happens to the run (a checkpoint,
``stop: eval_failed``) is the engine's policy. Results are logged by :mod:`hvdet.eval.results`.
The heartbeat (the watchdog's ``beat``) is attached here once, for the long waits (inference, a drain).
"""
from __future__ import annotations

from hvdet import mlperf
from hvdet.config import Config
from hvdet.eval import results
from hvdet.eval.background import EvalResult, EvaluatorProcess, start_evaluator
from hvdet.run import Run


def build_evaluator(cfg: Config, heartbeat=None):
    """The evaluator of ``eval.mode`` (background: this rank's evaluator process, started and ready)."""
    if cfg.eval.mode == "background":
        return BackgroundEvaluator(start_evaluator(cfg, heartbeat), heartbeat)
    return SyncEvaluator(heartbeat)


class SyncEvaluator:
    """``eval.mode: sync``: training waits while every rank infers its shard and rank 0 scores."""

    pending = False  # nothing outstanding between iterations

    def __init__(self, heartbeat=None):
        self.heartbeat = heartbeat

    def after_iteration(self, run: Run, due: bool) -> None:
        if due:
            results.evaluate_and_log(run, run.iteration, self.heartbeat)

    def finish(self, run: Run) -> None:
        if results.final_due(run):
            results.evaluate_and_log(run, run.iteration, self.heartbeat)

    def close(self) -> None:
        pass


class BackgroundEvaluator:
    """``eval.mode: background``: snapshots go to this rank's evaluator process and training goes on;
    a result counts at its snapshot's wall-clock plus its evaluation time (hvdet.eval.background)."""

    def __init__(self, process: EvaluatorProcess, heartbeat=None):
        self.process, self.heartbeat = process, heartbeat

    @property
    def pending(self) -> bool:
        """Snapshots are still out (the same on every rank): poll after every iteration until they are in."""
        return self.process.busy

    def after_iteration(self, run: Run, due: bool) -> None:
        if due:
            self._submit(run)
        for result in self.process.poll():  # collective
            self._record(run, result)

    def finish(self, run: Run) -> None:
        if results.final_due(run) and run.iteration != self.process.last_submitted:
            self._submit(run)
        for result in self.process.drain(self.heartbeat):  # collective: every outstanding result
            self._record(run, result)

    def close(self) -> None:
        self.process.close()  # outstanding snapshots end with the run

    def _submit(self, run: Run) -> None:
        """Hand the model at this iteration to the evaluator process; training goes on at once."""
        self.process.submit(run.iteration, run.model, results.start(run, run.iteration))
        if run.iteration < run.plan.max_iters:
            mlperf.block_start(run.logger, run.clock.images, run.loader.epoch)

    @staticmethod
    def _record(run: Run, result: EvalResult) -> None:
        snap = result.snapshot
        results.record(run, result.iteration, result.metrics, result.eval_s, snap["elapsed_s"] + result.eval_s, snap,
                       extra={"mode": "background", "snapshot_elapsed_s": snap["elapsed_s"],
                              "known_elapsed_s": run.clock.elapsed_s()})

"""Weights & Biases: the train / eval scalars, the resolved config and the summary of a run, on rank 0.

    log.wandb: true                 # pip install -e '.[wandb]'; then `wandb login`, or WANDB_MODE=offline
    log.project: hvdet              # the W&B project; the run's name is output_dir's last folder

Off by default. ``wandb.init`` reads the usual environment: ``WANDB_MODE=offline`` writes the run under
``output_dir/wandb/`` (or ``WANDB_DIR``) without network or login, for ``wandb sync`` later. Scalars
have the names TensorBoard gives them (``train/loss``, ``eval/bbox/AP``, ...), plotted against
``train/iteration`` / ``eval/iteration`` rather than W&B's own step, which must only grow: a
background evaluation reports an iteration that training has already passed.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from hvdet.tensorboard_log import flatten, summary_scalars


class WandbLog:
    def __init__(self, run):
        self._run = run

    @classmethod
    def open(cls, folder: str | os.PathLike, project: str, config: dict) -> WandbLog | None:
        """A W&B run named after ``folder``, ``config`` as its config; None (with a warning) if it fails."""
        try:
            import wandb  # installed: the config check said so (hvdet.config_checks)

            run = wandb.init(project=project, name=Path(folder).name, config=config,
                             dir=None if "WANDB_DIR" in os.environ else str(folder))
        except Exception as err:  # noqa: BLE001 -- not logged in, no network, ...: the run goes on without W&B
            warnings.warn(f"hvdet: no W&B run ({err}); `wandb login`, WANDB_MODE=offline, or log.wandb=false",
                          stacklevel=2)
            return None
        for kind in ("train", "eval"):
            run.define_metric(f"{kind}/*", step_metric=f"{kind}/iteration")
        return cls(run)

    def add(self, kind: str, record: dict) -> None:
        self._run.log({**flatten(record, kind), f"{kind}/iteration": int(record["iteration"])})

    def summary(self, summary: dict) -> None:
        self._run.summary.update(summary_scalars(summary))

    def close(self) -> None:
        self._run.finish()

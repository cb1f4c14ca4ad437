"""TensorBoard event files beside metrics.jsonl: every number of every train / eval record.

    tensorboard --logdir runs/          # then: train/loss, train/lr, train/images_per_s, train/*_s,
                                        #       eval/bbox/AP, eval/bbox/AP50, eval/segm/AP, ...

Optional: TensorBoard comes with ``make setup`` (setup.py's ``tensorboard`` extra); without it, or with
``log.tensorboard: false``, nothing is written and nothing else changes. The step of each scalar is
the record's ``iteration``, so a resumed run continues its curves.
"""
from __future__ import annotations

import os
import warnings
from numbers import Real
from pathlib import Path

SKIP = ("iteration", "epoch")


def flatten(record: dict, prefix: str) -> dict[str, float]:
    """``{"losses": {"a": 1}, "lr": 0.1}`` -> ``{"<prefix>/losses/a": 1.0, "<prefix>/lr": 0.1}`` (numbers only)."""
    out = {}
    for key, value in record.items():
        if key in SKIP:
            continue
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten(value, tag))
        elif isinstance(value, Real) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def summary_scalars(summary: dict) -> dict[str, float]:
    """summary.json's numbers as ``summary/<key>`` scalars (W&B, MLflow); ``reached`` counts as 1.0 / 0.0."""
    return flatten({k: float(v) if isinstance(v, bool) else v for k, v in summary.items()}, "summary")


class TensorBoardLog:
    def __init__(self, writer):
        self._writer = writer

    @classmethod
    def open(cls, folder: str | os.PathLike) -> TensorBoardLog | None:
        """A writer for ``folder`` (its ``tensorboard/`` subfolder), or None if TensorBoard is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            warnings.warn(f"hvdet: no TensorBoard events ({err}); `make setup` installs TensorBoard, or set "
                          "log.tensorboard=false", stacklevel=2)
            return None
        return cls(SummaryWriter(log_dir=str(Path(folder) / "tensorboard")))

    def add(self, kind: str, record: dict) -> None:
        step = int(record["iteration"])
        for tag, value in flatten(record, kind).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # the run may be killed at any time; events are few

    def summary(self, summary: dict) -> None:
        """Nothing: summary.json holds it (W&B and MLflow, the other sinks, take it)."""

    def close(self) -> None:
        self._writer.close()

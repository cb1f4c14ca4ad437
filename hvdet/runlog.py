"""What a run records: per-phase step timers, a JSON-lines metrics log, MLPerf events, a summary.

    log = RunLogger(cfg.output_dir, enabled=comm.is_main_process())
    log.mllog(MLLOG.RUN_START)
    timer = StepTimer()
    with timer.phase("data_s"):
        images, targets = next(loader)
    ...
    timer.step()
    if iteration % log_every == 0:
        phases = timer.window(max_over_ranks=("data_s",))    # collective: every rank calls it
        log.log_train({"iteration": iteration, "lr": lr, "loss": loss, **phases, ...})
        timer.reset()
    log.write_summary({"target": ..., "reached": True, "time_to_target_s": ...})

Files in ``output_dir`` (rank 0 writes; every other rank's logger is a no-op, so callers need no rank
checks): ``metrics.jsonl`` (one JSON object per line, ``"type": "train"`` or ``"eval"``, appended so a
resumed run continues it), ``mllog.txt`` (``:::MLLOG {...}`` lines that MLPerf's tooling parses) and
``summary.json`` (replaced atomically, so a reader never sees half a file).

Sinks: TensorBoard (``tensorboard=True``) and, where ``config.log`` turns them on, Weights & Biases and
MLflow (hvdet.wandb_log, hvdet.mlflow_log) take every train and eval record and the summary; W&B and
MLflow also take the config. A sink that fails is dropped with one warning: logging never stops training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from mlperf_logging.mllog import constants as MLLOG  # re-exported: MLLOG.RUN_START, ...
from mlperf_logging.mllog.mllog import MLLogger

from hvdet.atomic import atomic_write
from hvdet.tensorboard_log import TensorBoardLog

__all__ = ["MLLOG", "RunLogger", "StepTimer", "read_jsonl"]

METRICS_FILE, MLLOG_FILE, SUMMARY_FILE = "metrics.jsonl", "mllog.txt", "summary.json"
TRAIN_KEYS = ("iteration", "epoch", "elapsed_s", "lr", "loss", "losses", "images_per_s",
              "data_s", "forward_s", "backward_allreduce_s", "optimizer_s", "max_data_s",
              "trust_ratio", "agvm_variance", "agvm_lr_scale")  # the last three with log.diagnostics
EVAL_KEYS = ("iteration", "epoch", "elapsed_s", "eval_s", "bbox", "segm")
SUMMARY_KEYS = ("target", "reached", "time_to_target_s", "best", "world_size", "global_batch_size",
                "images_per_s", "train_s", "eval_s", "iterations")


def _jsonable(value):
    """Tensors, numpy scalars and non-finite floats -> plain, strictly valid JSON values."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # NaN/inf are not JSON; a diverged loss reads null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _drop_partial_last_line(path: Path) -> None:
    """A crash mid-write leaves an unterminated last line; appending to it would corrupt the next record."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class RunLogger:
    """Rank 0's record of a run. ``enabled=False`` (every other rank) turns each method into a no-op."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = False,
                 config=None):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.started = False  # run_start logged (the engine's loop may start again after an elastic reset)
        self.in_block = False  # an MLPerf block_start without its block_stop yet (hvdet.mlperf)
        self._metrics = None
        self._ml = None
        self._sinks = []
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._sinks = open_sinks(self.output_dir, tensorboard, config)
        # Line-buffered append: a crashed or resumed run keeps every line already logged.
        path = self.output_dir / METRICS_FILE
        _drop_partial_last_line(path)
        self._metrics = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        # A logger of our own rather than mllog.config(): that one is process-global and adds a file
        # handler per call, so two runs in one process (tests) would write into each other's files.
        handler = logging.FileHandler(self.output_dir / MLLOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        py_logger = logging.getLogger(f"hvdet.mllog.{id(self)}")
        py_logger.propagate = False
        py_logger.setLevel(logging.INFO)
        py_logger.addHandler(handler)
        self._ml = MLLogger(logger=py_logger, default_namespace="hvdet")

    # -- JSON lines ----------------------------------------------------------------------------
    def log_train(self, record: dict) -> None:
        """One training line; keys as in ``TRAIN_KEYS`` (``iteration`` is required)."""
        self._write_line("train", record)

    def log_eval(self, record: dict) -> None:
        """One evaluation line: ``iteration``, ``elapsed_s``, ``eval_s`` and ``bbox`` / ``segm`` metric dicts."""
        self._write_line("eval", record)

    def log_event(self, kind: str, record: dict) -> None:
        """Another kind of line, e.g. ``world``: the world size changed (elastic training)."""
        self._write_line(kind, record)

    def _write_line(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        if "iteration" not in record:
            raise ValueError(f"a {kind} record needs an 'iteration' key; got keys {sorted(record)}")
        line = json.dumps({"type": kind, **_jsonable(record)}, allow_nan=False)
        self._metrics.write(line + "\n")
        if kind in ("train", "eval"):
            self._to_sinks("add", kind, record)

    def _to_sinks(self, method: str, *args) -> None:
        for sink in list(self._sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as err:  # noqa: BLE001 -- a full disk, a lost server: the run matters more than its log
                # Dropped without its close(): against a lost server that would wait out the retries again.
                self._sinks.remove(sink)
                warnings.warn(f"hvdet: {type(sink).__name__}.{method} failed ({err!r}); it logs nothing more "
                              "in this run, training goes on", stacklevel=3)

    # -- MLPerf --------------------------------------------------------------------------------
    def mllog(self, key: str, value=None, metadata: dict | None = None) -> None:
        """An MLPerf ``:::MLLOG`` event. ``*_start`` / ``*_stop`` keys (``MLLOG.RUN_START``,
        ``MLLOG.EPOCH_STOP``, ...) open and close intervals, as MLPerf's reference code logs them;
        any other key is a point in time (``MLLOG.EVAL_ACCURACY``, ``MLLOG.GLOBAL_BATCH_SIZE``, ...)."""
        if not self.enabled:
            return
        if key.endswith("_start"):
            log = self._ml.start
        elif key.endswith("_stop"):
            log = self._ml.end
        else:
            log = self._ml.event
        # stack_offset=2: MLPerf records the file:line that called *this* method, not this wrapper.
        log(key=key, value=_jsonable(value), metadata=_jsonable(metadata), stack_offset=2)

    def truncate_after(self, iteration: int) -> int:
        """Drop the records of iterations after ``iteration`` (a resume from its checkpoint repeats
        them; keeping both would duplicate them, and their ``elapsed_s`` would run backwards).
        Returns how many were dropped."""
        if not self.enabled:
            return 0
        path = self.output_dir / METRICS_FILE
        records = read_jsonl(path)
        kept = [r for r in records if r.get("iteration", 0) <= iteration]
        if len(kept) < len(records):
            self._metrics.close()
            atomic_write(path, lambda f: f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept))
            self._metrics = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        return len(records) - len(kept)

    # -- summary -------------------------------------------------------------------------------
    def write_summary(self, summary: dict) -> Path | None:
        """``summary.json``, written to a temp file in the same folder and renamed over the old one."""
        if not self.enabled:
            return None

        def write(f):
            json.dump(_jsonable(summary), f, indent=2, allow_nan=False)
            f.write("\n")

        path = atomic_write(self.output_dir / SUMMARY_FILE, write)
        self._to_sinks("summary", _jsonable(summary))
        return path

    def close(self) -> None:
        self._to_sinks("close")
        self._sinks = []
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._ml is not None:
            for handler in list(self._ml.logger.handlers):
                handler.close()
                self._ml.logger.removeHandler(handler)
            self._ml = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_sinks(output_dir: Path, tensorboard: bool, config=None) -> list:
    """The sinks asked for: TensorBoard, and W&B / MLflow where ``config.log`` (a Config's) turns them on,
    with the resolved config as their run's config / params. One that fails to open warns and is left out."""
    sinks = [TensorBoardLog.open(output_dir)] if tensorboard else []
    log = config.log if config is not None else None
    if log is not None and log.wandb:
        from hvdet.wandb_log import WandbLog  # lazily: optional, and slow to import

        sinks.append(WandbLog.open(output_dir, log.project, dataclasses.asdict(config)))
    if log is not None and log.mlflow:
        from hvdet.mlflow_log import MlflowLog

        sinks.append(MlflowLog.open(output_dir, log.project, log.mlflow_tracking_uri, dataclasses.asdict(config)))
    return [sink for sink in sinks if sink is not None]


class StepTimer:
    """Wall-clock seconds per named phase, accumulated over a logging window of iterations.

    Phases are what the train record reports: ``data_s``, ``forward_s``, ``backward_allreduce_s``
    (backward and Horovod's allreduce overlap, so they are timed as one), ``optimizer_s``.
    ``cuda_sync=True`` synchronizes the GPU at each phase boundary: kernels run asynchronously, and
    without it their time lands in whichever later phase first waits for them.
    """

    def __init__(self, cuda_sync: bool = False):
        self.cuda_sync = cuda_sync
        self.reset()

    def reset(self) -> None:
        self.totals_s: dict[str, float] = {}
        self.iterations = 0
        self._window_start = time.perf_counter()

    def _now(self) -> float:
        if self.cuda_sync:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self.add(name, self._now() - start)

    def add(self, name: str, seconds: float) -> None:
        self.totals_s[name] = self.totals_s.get(name, 0.0) + seconds

    def step(self) -> None:
        """Mark the end of one iteration."""
        self.iterations += 1

    def means(self) -> dict[str, float]:
        """Seconds per iteration of each phase over the window (0 iterations -> the totals)."""
        return {name: total / max(self.iterations, 1) for name, total in self.totals_s.items()}

    def window(self, max_over_ranks: tuple[str, ...] = ("data_s",)) -> dict[str, float]:
        """``means()`` plus ``max_<phase>``: that phase's largest mean over all ranks, and ``window_s``
        (wall-clock since the last reset) and ``iterations``.

        A collective when more than one rank runs: every rank must call it at the same iteration.
        The max matters because the slowest rank's input pipeline stalls every rank's allreduce.
        """
        out = self.means()
        if max_over_ranks:
            import torch

            from hvdet import comm  # lazily: the timer itself works without Horovod

            local = torch.tensor([out.get(name, 0.0) for name in max_over_ranks], dtype=torch.float64)
            largest = comm.allreduce(local, op="max") if comm.size() > 1 else local
            out.update({f"max_{name}": float(v) for name, v in zip(max_over_ranks, largest, strict=True)})
        out["window_s"] = time.perf_counter() - self._window_start
        out["iterations"] = self.iterations
        return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``metrics.jsonl``; a bad line is an error naming the file and line number,
    except an unterminated last line, which a run killed mid-write leaves behind (it is skipped)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: cut off, not corrupt
                break
            raise ValueError(f"{path}:{lineno}: not a JSON object ({err.msg}): {line[:80]!r}") from err
    return records

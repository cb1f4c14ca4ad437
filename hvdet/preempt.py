"""Preemption: SIGTERM, SIGINT or SIGUSR1 on any rank stop every rank at the same iteration boundary.

A cluster takes GPUs back with a signal (SLURM: ``--signal=B:USR1@120`` to the batch script, or
SIGTERM at the end of the time limit; Ctrl-C is SIGINT). The handler only records the signal; the
next training step carries "a rank was signalled" in the loss check it already allreduces every
iteration (:func:`hvdet.step.check_losses`), so every rank learns it at the same iteration, finishes
that step, writes a checkpoint and ``summary.json`` with ``stop: preempted``, and exits with
:data:`hvdet.exit_codes.EXIT_PREEMPTED`. ``--resume`` then continues bit-exactly.

A second SIGINT (Ctrl-C twice) ends the process at once, as Python's default would.
"""
from __future__ import annotations

import signal
import threading
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers (main thread only) while in a ``with`` block and records a signal."""

    def __init__(self):
        self.signal: int | None = None   # the first signal this rank received
        self.agreed = False              # set by the engine from the step: some rank was signalled
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = self.signal or signum

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

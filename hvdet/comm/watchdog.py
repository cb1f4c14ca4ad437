"""The backstop of the stall policy: a rank that makes no progress for ``comm.timeout_s`` exits.

A collective waiting on a stalled peer raises where it can (the shared-memory groups name the missing
ranks, Horovod's Gloo controller times out, Horovod's stall shutdown ends its ops), but a wait may
also sit where nothing times out (an MPI collective, a Horovod op when the coordinator itself is the
stalled rank). The training loop calls :meth:`Watchdog.beat` at every iteration, evaluation batch
and checkpoint; when no beat came for ``timeout_s`` plus a grace (so that the collectives' own, more
precise errors come first), the watchdog prints one line naming what this rank was doing and ends the
process with :data:`EXIT_STALLED`. The launcher then ends the job: no rank stays alive after giving up.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Self

EXIT_STALLED = 3
GRACE_S = 5.0


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, grace_s: float = GRACE_S):
        self.timeout_s, self.rank, self.grace_s = timeout_s, rank, grace_s
        self._last, self._where = time.monotonic(), "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hvdet-watchdog", daemon=True)

    def beat(self, where: str) -> None:
        """Progress: ``where`` is what this rank does next (named if it never comes back)."""
        self._last, self._where = time.monotonic(), where

    def __enter__(self) -> Self:
        self.beat("starting")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        limit = self.timeout_s + self.grace_s
        while not self._stop.wait(min(1.0, limit / 10)):
            idle = time.monotonic() - self._last
            if idle > limit:
                print(f"hvdet: rank {self.rank}: no progress for {idle:.0f} s while {self._where} "
                      f"(comm.timeout_s={self.timeout_s:g}): a peer is dead or stalled; exiting with code "
                      f"{EXIT_STALLED}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(EXIT_STALLED)

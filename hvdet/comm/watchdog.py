"""The backstop of the stall policy: a rank that makes no progress for ``comm.timeout_s`` is ended.

A collective waiting on a stalled peer raises where it can (the shared-memory groups name the missing
ranks, Horovod's Gloo controller times out, Horovod's stall shutdown ends its ops), but a wait may
also sit where nothing times out: under mpirun, a stopped peer's Horovod thread stops answering, so
this rank's Horovod thread blocks in MPI, and the next gradient allreduce that backward enqueues
blocks on it *holding the GIL* (measured: rank 0 stuck in ``_allreduce_async`` for minutes), where no
Python thread of this process can run. So the watchdog is a separate, tiny process
(``_watchdog_child.py``, no torch, no Horovod): the training loop writes a line to it at every
iteration, evaluation batch and checkpoint (:meth:`Watchdog.beat`); when none came for ``timeout_s``
plus a grace (so that the collectives' own, more precise errors come first), it prints one line
naming what this rank was doing, records exit code :data:`EXIT_STALLED` for the launch scripts
(``HVDET_EXIT_FILE``), and kills this rank. The launcher then ends the job: no rank stays alive after
giving up. It exits by itself when this process ends (its pipe closes).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from hvdet.comm import _watchdog_child
from hvdet.errors import HvdetError
from hvdet.exit_codes import EXIT_STALLED

GRACE_S = 5.0


class PeerDiedError(HvdetError, RuntimeError):
    """A peer rank's process was killed (its watchdog saw it go without a word); names rank and host."""
_CHILD = Path(__file__).with_name("_watchdog_child.py")


def _explained(err: TimeoutError) -> TimeoutError:
    err.explained = True  # the peers' progress is in the message already
    return err


class Watchdog:
    """``beat_dir``: where every rank's watchdog notes its rank's last progress (once a second), so
    the one that fires can name the ranks that stalled; the run directory's ``.watchdog``."""

    def __init__(self, timeout_s: float, rank: int, beat_dir: str | os.PathLike, grace_s: float = GRACE_S):
        self.timeout_s, self.rank, self.grace_s = timeout_s, rank, grace_s
        self.beat_dir = Path(beat_dir)
        self._proc: subprocess.Popen | None = None
        self._last, self._where, self._started = time.monotonic(), "starting", time.time()

    def beat(self, where: str) -> None:
        """Progress: ``where`` is what this rank does next (named if it never comes back)."""
        self._last, self._where = time.monotonic(), where
        if self._proc is not None:
            line = f"{self.rank}\t{where}".replace("\n", " ")[:500] + "\n"
            try:
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):  # the watchdog is gone: nothing left to tell
                self._proc = None

    def explain(self, err: BaseException) -> BaseException:
        """``err`` itself, or, for a peer-loss error (Horovod's) after ``timeout_s`` without progress, the
        stall it is: a TimeoutError naming what this rank waited in and the other ranks' last progress
        (Horovod's Gloo time-out and stall shutdown end the wait, but say only "Horovod has been shut
        down")."""
        from hvdet.comm import world

        if isinstance(err, TimeoutError) and not getattr(err, "explained", False):
            # A group collective's own time-out (shared memory, torch.distributed): add who was where.
            peers = _watchdog_child.others(str(self.beat_dir), str(self.rank), self._started, self.timeout_s)
            return _explained(TimeoutError(f"{err}{peers}")) if peers else err
        if not world.is_peer_loss(err):
            return err
        died = self._died_peers()
        if died:
            return PeerDiedError(f"{died}; this rank lost it in a collective while {self._where} "
                                 f"({type(err).__name__})")
        idle = time.monotonic() - self._last
        if idle < 0.9 * self.timeout_s:
            return err
        peers = _watchdog_child.others(str(self.beat_dir), str(self.rank), self._started, self.timeout_s)
        return _explained(TimeoutError(f"no progress for {idle:.1f} s while {self._where} (comm.timeout_s="
                                       f"{self.timeout_s:g}): a peer stalled and Horovod gave up{peers}"))

    def _died_peers(self, wait_s: float = 2.0) -> str:
        """"rank 2 on h2 died 0.4 s after its last progress, in iteration 5 [...]" for the ranks whose
        process ended without closing its watchdog (killed), or "". Their watchdogs mark the file as
        soon as they see it; a peer's connection may break a moment before: wait up to ``wait_s``."""
        def died() -> list:
            return [b for b in _watchdog_child.beats_of_others(str(self.beat_dir), str(self.rank), self._started,
                                                               self.timeout_s) if _watchdog_child.DIED in b[3]]

        deadline = time.monotonic() + wait_s
        while not (found := died()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if found:  # a host's ranks die together: give the others' watchdogs a moment to say so too
            time.sleep(0.5)
            found = died()
        return "; ".join(f"rank {r} on {host} was killed (its process ended without a word: SIGKILL, the "
                         f"out-of-memory killer), last seen {where.replace(_watchdog_child.DIED, '')}"
                         for _, r, host, where in sorted(found, key=lambda b: int(b[1]))[:4])

    def __enter__(self) -> Self:
        self.beat_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-S", str(_CHILD), str(os.getpid()), str(self.timeout_s), str(self.grace_s),
                str(EXIT_STALLED), str(self.beat_dir)]
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, close_fds=True)
        self.beat("starting")
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            # "Ending", then the end of its input: the child removes this rank's file and exits. (Input
            # that ends without the word is a killed rank's: the file stays, marked.)
            with contextlib.suppress(BrokenPipeError, ValueError):
                self._proc.stdin.write(_watchdog_child.END + b"\n")
                self._proc.stdin.flush()
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            self._proc.wait(timeout=10)
            self._proc = None
            with contextlib.suppress(OSError):  # the last rank out removes the folder
                self.beat_dir.rmdir()

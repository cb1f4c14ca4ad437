"""The exit codes of ``train.py`` and how a rank reports its code past the launcher (stdlib only:
the watchdog process, which loads no torch, uses it too).

Launchers turn every rank failure into their own code (horovodrun: 1); ``launch/supervise.sh``
creates ``HVDET_EXIT_FILE``, every failing rank appends its code, and the first line is the job's.
"""
from __future__ import annotations

import contextlib
import os

# 75 is EX_TEMPFAIL (sysexits.h): the run stopped cleanly and can be resumed; 130 is 128 + SIGINT, the shell's.
EXIT_FAILED, EXIT_CONFIG, EXIT_STALLED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 3, 75, 130


def record(code: int) -> int:
    """``code``, also appended to ``HVDET_EXIT_FILE`` when a launch script asked for it."""
    path = os.environ.get("HVDET_EXIT_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "a") as f:
            f.write(f"{code}\n")
    return code

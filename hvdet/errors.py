"""The base of hvdet's own errors: each carries its exit code and the one line the CLI prints for it.

Stdlib only (every layer raises these, down to the torch-free config and the watchdog's world). A
domain error keeps its builtin base as a second base (``class WriteError(HvdetError, OSError)``), so
``except OSError`` around a write still catches it; :func:`hvdet.cli._classify` needs no list of
names: ``isinstance(err, HvdetError)`` and ``err.exit_code``.
"""
from __future__ import annotations

from hvdet.exit_codes import EXIT_FAILED


def first_line(err: BaseException) -> str:
    """The first line of ``str(err)``, or the class name for an empty message: a failure is one line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class HvdetError(Exception):
    """An error whose message names the file, rank or iteration at fault, so it needs no traceback
    on the console (it still goes to ``output_dir/errors/rank<N>.log``)."""

    exit_code = EXIT_FAILED
    label = ""  # what the CLI prints before the message, e.g. "config error: "

    def one_line(self) -> str:
        """The line the CLI prints (after ``hvdet: rank N:`` or ``hvdet predict:``)."""
        return self.label + first_line(self)

"""Where a benchmark's figures come from: the commit they measured and the machine's load.

Every script in benchmarks/ records ``provenance()`` in its JSON, so a figure in the README can be
traced to the code that produced it (a tree with uncommitted changes says so).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (a copied tree, a Docker image without .git)
    return out.stdout.strip()


def provenance() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "uncommitted_changes": bool(status) if status is not None else None,
            "load_avg": os.getloadavg()}

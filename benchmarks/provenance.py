"""Where a benchmark's figures come from: the commit they measured and the machine's load.

Every script in benchmarks/ records ``provenance()`` in its JSON, so a figure in the README can be
traced to the code that produced it (a tree with uncommitted changes says so). ``source_sha256`` names
the code itself, where ``.git`` cannot: a copied tree whose ``.git`` is older than its files (the lent
GPU machine's copy of a session's checkout reported the session's first commit on 2026-12-04 for
code committed later), or no ``.git`` at all. ``python3 -m benchmarks.provenance`` prints it for a
checkout, to compare.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("hvdet/**/*.py", "hvdet/**/*.cpp", "benchmarks/*.py", "launch/*.py", "launch/*.sh", "tests/*.py",
           "train.py")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (a copied tree, a Docker image without .git)
    return out.stdout.strip()


def source_sha256(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of the source files (:data:`SOURCES`) under ``root``, in path order."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCES for p in root.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def provenance() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "uncommitted_changes": bool(status) if status is not None else None,
            "source_sha256": source_sha256(), "load_avg": os.getloadavg()}


if __name__ == "__main__":
    print(source_sha256())

"""Checkpoint files: written atomically by rank 0, found, read and pruned. Pure I/O.

What a checkpoint holds is :meth:`hvdet.run.Run.state_dict` (plus a format marker); this module
never looks inside beyond that marker and the model weights that ``--eval-only`` needs. Files are
``output_dir/checkpoints/iter_<iteration>.pt``, with ``last.pt`` a symlink to the newest.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from hvdet import comm
from hvdet.atomic import atomic_write
from hvdet.errors import HvdetError

FORMAT = "hvdet-checkpoint-1"
_NAME = re.compile(r"^iter_(\d+)\.pt$")
# An hvdet checkpoint holds, besides tensors and plain Python objects, numpy RNG states (an ndarray of
# uint32): their few numpy types are what torch.load(weights_only=True) must be allowed to rebuild.
NUMPY_RNG_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(HvdetError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit this run; the message names the file."""


def path_for(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iter_{iteration:07d}.pt"


def save(state: dict, path: str | os.PathLike) -> Path | None:
    """Write ``state`` to ``path`` on rank 0 only, atomically: a reader (or a resume after a crash
    mid-write) sees the old file or the complete new one, never a truncated one."""
    if not comm.is_main_process():
        return None
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), binary=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run's ``output_dir`` (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"{path} is a directory without checkpoints "
                                  f"(looked for {path}/checkpoints/iter_*.pt)")
        return found
    return path


def read_weights_only(path: str | os.PathLike):
    """``torch.load`` on the CPU with ``weights_only=True``: tensors, plain containers and numbers, and
    numpy RNG states (:data:`NUMPY_RNG_GLOBALS`, allowed by name), so no code in the file can run.
    For files from elsewhere: ``model.pretrained_backbone``, ``model.init_from``."""
    with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read(path: Path, weights_only: bool = False):
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if weights_only:
            return read_weights_only(path)
        # Our own files, holding numpy RNG states and plain Python objects besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {_cause(err)})") from None


def _cause(err: Exception) -> str:
    """One line of torch's message: a weights_only refusal's paragraphs (advice to load with
    weights_only=False first) come down to the line naming the global it refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint (on the CPU). Every rank reads the same file, so all start identical."""
    path = resolve(path)
    state = _read(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hvdet checkpoint (no format {FORMAT!r} marker); "
                              "for --eval-only a plain model state_dict is accepted too")
    return state


def model_state(path: str | os.PathLike) -> dict:
    """The model weights of an hvdet checkpoint, or of a file holding a plain state_dict."""
    return model_and_config(path)[0]


def model_and_config(path: str | os.PathLike, weights_only: bool = False) -> tuple[dict, dict | None]:
    """The model weights of a checkpoint (read once) and, for an hvdet checkpoint, the config of the
    run that wrote it (a plain dict, :func:`hvdet.config.to_dict`'s); None for a plain state_dict.
    ``weights_only``: read with :func:`read_weights_only` (a file that may come from anywhere)."""
    path = resolve(path)
    state = _read(path, weights_only)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"], state.get("config")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        return state["model"], None
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        return state, None
    raise CheckpointError(f"{path} holds neither an hvdet checkpoint nor a model state_dict")


def prune(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` periodic checkpoints (rank 0; 0 keeps all)."""
    if keep_last <= 0 or not comm.is_main_process():
        return
    folder = Path(output_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("iter_*.pt") if (m := _NAME.match(p.name)))
    for _, p in found[:-keep_last]:
        p.unlink(missing_ok=True)


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run (``output_dir`` or its ``checkpoints`` folder), or None."""
    folder = Path(output_dir) / "checkpoints"
    folder = folder if folder.is_dir() else Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in folder.glob("iter_*.pt") if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def save_numbered(state: dict, output_dir: str | os.PathLike, iteration: int, keep_last: int = 0) -> Path:
    """``state`` as ``output_dir``'s checkpoint of ``iteration``, ``last.pt`` pointing at it, older
    periodic ones pruned to ``keep_last`` (rank 0 writes; the others get the path)."""
    path = path_for(output_dir, iteration)
    if save(state, path) is not None:
        _link_last(path)
        prune(output_dir, keep_last)
    return path


def _link_last(path: Path) -> None:
    """``checkpoints/last.pt`` -> the newest checkpoint (a relative symlink, replaced atomically)."""
    tmp = path.with_name(".last.pt.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, path.with_name("last.pt"))

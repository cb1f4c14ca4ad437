"""Checkpoints: everything needed to continue a run exactly, written atomically by rank 0.

A checkpoint holds the model, the optimizer state (PMD-LAMB's moments and step counter included), the
AMP scaler, AGVM's smoothed scales, the iteration (the schedule is a pure function of it), the train
loader's position (epoch and batch within it), every rank's RNG states, the world size and global
batch it was written with, and the time-to-accuracy bookkeeping (elapsed time, evaluations so far).

Resuming on another number of ranks changes the global batch. ``on_world_size_change="rescale"``
continues with the lr given by the linear scaling rule for the new batch (the run's lr is always
``base_lr * global_batch / reference_batch``), at the same images consumed (the iteration converted
when the recipe's length follows the batch, the sampler at the same point of its epoch) and with
fresh per-rank RNG streams; ``"refuse"`` stops with a message.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from hvdet import comm
from hvdet.atomic import atomic_write

FORMAT = "hvdet-checkpoint-1"
_NAME = re.compile(r"^iter_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit this run; the message names the file."""


def path_for(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"iter_{iteration:07d}.pt"


def rng_state() -> dict:
    """This rank's random number generator states (torch, CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states, in rank order (collective: every rank calls it at the same iteration)."""
    return comm.allgather_object(rng_state())


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
            raise CheckpointError(f"{path} is a directory without checkpoints (looked for {path}/checkpoints/iter_*.pt)")
        return found
    return path


def _read(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our own files, holding numpy RNG states and plain Python objects besides tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None


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
    path = resolve(path)
    state = _read(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        return state["model"]
    if isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values()):
        return state
    raise CheckpointError(f"{path} holds neither an hvdet checkpoint nor a model state_dict")


def resume_policy(state: dict, path, world_size: int, global_batch: int, policy: str) -> float:
    """Check a checkpoint against this run's world size; return the lr factor new/old batch.

    policy ``rescale``: accept, the lr follows the linear scaling rule; ``refuse``: raise.
    """
    old_world, old_batch = state["world_size"], state["global_batch"]
    if old_world == world_size and old_batch == global_batch:
        return 1.0
    if policy == "refuse":
        raise CheckpointError(
            f"checkpoint {path} was written by a run on {old_world} ranks (global batch {old_batch}); this run "
            f"has {world_size} ranks (global batch {global_batch}). Launch it with -np {old_world}, or set "
            f"checkpoint.on_world_size_change=rescale to continue with the lr scaled by the linear "
            f"scaling rule (x{global_batch / old_batch:g})")
    return global_batch / old_batch


def loader_state_for(state: dict, pass_batch: int) -> dict:
    """The train loader's state for this run: the same one, or the same images consumed in the epoch."""
    loader = dict(state["loader"])
    old = state["global_batch"] // state["config"]["solver"].get("backward_passes_per_step", 1)
    if old != pass_batch and "position" in loader:
        # position counts this rank's batches in the epoch, each a pass over all ranks.
        loader["position"] = loader["position"] * old // pass_batch
    return loader


def resumed_iteration(state: dict, cfg, global_batch: int) -> int:
    """Where a resumed run continues. When the plan's length follows the batch (max_epochs or
    iters_at_batch), the same images consumed; otherwise the recipe counts iterations as they are."""
    if state["global_batch"] == global_batch or not (cfg.solver.max_epochs or cfg.solver.iters_at_batch):
        return state["iteration"]
    return round(state["iteration"] * state["global_batch"] / global_batch)


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


# ---------------------------------------------------------------------------------------------
# A training run's checkpoint (``run`` is hvdet.engine.Run)
# ---------------------------------------------------------------------------------------------

def save_run(run, iteration: int) -> Path:
    """Checkpoint ``run`` after ``iteration`` iterations (collective; rank 0 writes)."""
    from hvdet.config import lr_at, to_dict

    rngs = gather_rng_states()  # collective: every rank is here at the same iteration
    state = {"iteration": iteration, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "agvm": run.agvm.state_dict() if run.agvm else None,
             "loader": run.loader.state_dict(), "rng": rngs, "world_size": run.plan.world_size,
             "global_batch": run.plan.global_batch, "lr": lr_at(run.cfg, run.plan, iteration - 1),
             "config": to_dict(run.cfg), "clock": run.clock.state()}
    path = path_for(run.cfg.output_dir, iteration)
    if save(state, path) is not None:
        _link_last(path)
        prune(run.cfg.output_dir, run.cfg.checkpoint.keep_last)
    return path


def _link_last(path: Path) -> None:
    """``checkpoints/last.pt`` -> the newest checkpoint (a relative symlink, replaced atomically)."""
    tmp = path.with_name(".last.pt.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(path.name, tmp)
    os.replace(tmp, path.with_name("last.pt"))


def restore_run(run, state: dict, path: str | os.PathLike, reseed) -> None:
    """Continue ``run`` from ``state``, the checkpoint :func:`load` read from ``path`` (every rank
    reads the same file). ``reseed(seed, rank)`` makes fresh per-rank RNG streams when the world
    size changed."""
    world, plan = comm.size(), run.plan
    factor = resume_policy(state, path, world, plan.global_batch, run.cfg.checkpoint.on_world_size_change)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.agvm is not None and state.get("agvm"):
        run.agvm.load_state_dict(state["agvm"])
    passes = run.cfg.solver.backward_passes_per_step
    run.loader.load_state_dict(loader_state_for(state, plan.global_batch // passes))
    if state["world_size"] == world and state["global_batch"] == plan.global_batch:
        set_rng_state(state["rng"][comm.rank()])
    else:  # other ranks or batches, other sampling streams: exact continuation is impossible anyway
        reseed(run.cfg.seed + state["iteration"], comm.rank())
    run.clock = type(run.clock)(**{k: v for k, v in state["clock"].items() if k != "start"})
    run.start_step = resumed_iteration(state, run.cfg, plan.global_batch)
    if comm.is_main_process() and factor != 1.0:
        print(f"resuming {path}: {state['world_size']} -> {world} ranks, global batch {state['global_batch']} -> "
              f"{plan.global_batch}, lr x{factor:g} by the linear scaling rule", flush=True)

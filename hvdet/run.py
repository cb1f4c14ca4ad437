"""A training run's state: its parts, its clock, and the state_dict that continues it exactly.

:class:`Run` holds what :func:`hvdet.builders.build_run` built (model, Horovod's optimizer, loader, scaler,
AGVM) and what the loop advances (the iteration, the :class:`Clock`). ``state_dict()`` is everything
a resumed run needs: the model, the optimizer state (PMD-LAMB's moments and step counter included),
the AMP scaler, AGVM's smoothed scales, the iteration (the schedule is a pure function of it), the
train loader's position, every rank's RNG states, the world size and global batch, and the clock.
:mod:`hvdet.checkpoint` only writes and reads such dicts.

Resuming on another number of ranks changes the global batch. ``on_world_size_change="rescale"``
continues with the lr given by the linear scaling rule for the new batch (the run's lr is always
``base_lr * global_batch / reference_batch``), at the same images consumed (the iteration converted
when the recipe's length follows the batch, the sampler at the same point of its epoch) and with
fresh per-rank RNG streams; ``"refuse"`` stops with a message.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hvdet import comm
from hvdet.checkpoint import CheckpointError
from hvdet.config import Config, to_dict
from hvdet.data import TrainLoader
from hvdet.data.protocol import DetectionDataset
from hvdet.optim import AGVM
from hvdet.plan import Plan
from hvdet.runlog import RunLogger
from hvdet.step import StepSettings


@dataclass
class Clock:
    """Time-to-accuracy bookkeeping; saved in checkpoints so a resumed run keeps counting."""

    elapsed_offset_s: float = 0.0   # wall-clock of the earlier segments of this run (before a resume)
    train_s: float = 0.0
    eval_s: float = 0.0
    images: int = 0
    best: dict = field(default_factory=dict)
    reached: bool = False
    time_to_target_s: float | None = None
    evaluations: int = 0
    evaluated_at: int = -1          # the iteration of the latest evaluation
    start: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed_s(self) -> float:
        return self.elapsed_offset_s + time.perf_counter() - self.start

    def state_dict(self) -> dict:
        out = asdict(self)
        out.pop("start")
        out["elapsed_offset_s"] = self.elapsed_s()
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> Clock:
        return cls(**{k: v for k, v in state.items() if k != "start"})


@dataclass
class Run:
    cfg: Config
    plan: Plan
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer      # Horovod's DistributedOptimizer (comm.gradients=ddp: DDP's, same protocol)
    loader: TrainLoader
    val_set: DetectionDataset
    logger: RunLogger
    scaler: torch.amp.GradScaler
    agvm: AGVM | None = None
    settings: StepSettings = field(default_factory=StepSettings)  # the step's, from the recipe (builders)
    clock: Clock = field(default_factory=Clock)
    iteration: int = 0                    # iterations done (the next step's 0-based index)
    evaluator: object | None = None       # hvdet.eval.evaluators: Sync- or BackgroundEvaluator, set by the engine

    def state_dict(self) -> dict:
        """Everything that continues this run (collective: gathers every rank's RNG states)."""
        return {"iteration": self.iteration, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "agvm": self.agvm.state_dict() if self.agvm else None, "loader": self.loader.state_dict(),
                "rng": comm.allgather_object(rng_state()), "world_size": self.plan.world_size,
                "global_batch": self.plan.global_batch, "config": to_dict(self.cfg), "clock": self.clock.state_dict()}

    def load_state_dict(self, state: dict, source: str = "<state>") -> None:
        """Continue from ``state`` (every rank reads the same checkpoint, ``source`` names it)."""
        world, plan, cfg = comm.size(), self.plan, self.cfg
        factor = resume_policy(state, source, world, plan.global_batch, cfg.checkpoint.on_world_size_change)
        check_model_fits(state, source, self.model, cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.agvm is not None and state.get("agvm"):
            self.agvm.load_state_dict(state["agvm"])
        self.loader.load_state_dict(loader_state_for(state, plan.global_batch // cfg.solver.backward_passes_per_step))
        if state["world_size"] == world and state["global_batch"] == plan.global_batch:
            set_rng_state(state["rng"][comm.rank()])
        else:  # other ranks or batches, other sampling streams: exact continuation is impossible anyway
            seed_rank(cfg.seed + state["iteration"], comm.rank())
        self.clock = Clock.from_state_dict(state["clock"])
        self.iteration = resumed_iteration(state, cfg, plan.global_batch)
        if comm.is_main_process() and factor != 1.0:
            print(f"resuming {source}: {state['world_size']} -> {world} ranks, global batch {state['global_batch']} "
                  f"-> {plan.global_batch}, lr x{factor:g} by the linear scaling rule", flush=True)


def check_model_fits(state: dict, source, model: torch.nn.Module, cfg: Config) -> None:
    """A checkpoint of another architecture or norm is a one-line CheckpointError naming both (not
    torch's thousands of characters of missing and unexpected keys)."""
    mine, theirs = model.state_dict(), state["model"]
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [k for k in mine if k in theirs and tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if not (missing or unexpected or shapes):
        return
    old = state.get("config", {}).get("model", {})
    first = (missing or unexpected or shapes)[0]
    raise CheckpointError(
        f"checkpoint {source} holds another model (model.arch={old.get('arch', '?')}, "
        f"model.norm={old.get('norm', '?')}) than this run's (model.arch={cfg.model.arch}, "
        f"model.norm={cfg.model.norm}): {len(missing)} tensors missing, {len(unexpected)} unexpected, "
        f"{len(shapes)} of another shape (first: {first}); resume with the recipe that wrote it")


# ---------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------

def seed_rank(seed: int, rank: int) -> None:
    """Per-rank RPN/RoI sampling streams, reproducible for each (seed, rank)."""
    value = seed * 1000 + rank + 1
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


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


# ---------------------------------------------------------------------------------------------
# Resuming on another world size
# ---------------------------------------------------------------------------------------------

def resume_policy(state: dict, source, world_size: int, global_batch: int, policy: str) -> float:
    """Check a checkpoint against this run's world size; return the lr factor new/old batch.

    policy ``rescale``: accept, the lr follows the linear scaling rule; ``refuse``: raise.
    """
    old_world, old_batch = state["world_size"], state["global_batch"]
    if old_world == world_size and old_batch == global_batch:
        return 1.0
    if policy == "refuse":
        raise CheckpointError(
            f"checkpoint {source} was written by a run on {old_world} ranks (global batch {old_batch}); this run "
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


def resumed_iteration(state: dict, cfg: Config, global_batch: int) -> int:
    """Where a resumed run continues. When the plan's length follows the batch (max_epochs or
    iters_at_batch), the same images consumed; otherwise the recipe counts iterations as they are."""
    if state["global_batch"] == global_batch or not (cfg.solver.max_epochs or cfg.solver.iters_at_batch):
        return state["iteration"]
    return round(state["iteration"] * state["global_batch"] / global_batch)

"""Collectives over groups of consecutive ranks (Cross-GPU BatchNorm, AGVM's half-world means).

Several backends, one module each (:data:`hvdet.registry.GROUP_BACKENDS`), because their latency
decides the cost of a BN layer; each is a class with ``open(group_size)`` (collective over the world;
None where it cannot work in this job), ``allreduce(tensor, op)`` and ``allgather(tensor)``:

* ``"horovod"`` (:mod:`hvdet.comm.horovod_group`): a Horovod process set; waits for Horovod's cycle
  (none under ``comm.gradients: ddp``, whose world is torch.distributed's: ``auto`` takes shm or torch).
* ``"torch"`` (:mod:`hvdet.comm.torch_group`): torch.distributed, NCCL for CUDA and Gloo for CPU tensors.
* ``"mpi"`` (:mod:`hvdet.comm.mpi_group`): an mpi4py communicator; only when launched by ``mpirun``.
* ``"shm"`` (:mod:`hvdet.comm.shm`): a shared-memory segment per group when every group's ranks share
  one x86-64 host; CPU tensors of up to 8192 elements. Microseconds, under any launcher.

Opened backends and groups are cached per group size; :func:`reset` forgets them (a world that
changes size, as elastic training's does, needs new ones).

Simulated ranks: the fast tests run N ranks as N threads of one process (tests/simulated.py). A thread
that enters :func:`simulated_world` gets its groups from that rank's world: :func:`consecutive_groups`
(so Cross-GPU BN) and :func:`allreduce_small` (the loss check) answer from it, and AGVM takes its
collectives from :func:`simulated`. Never entered in a real run, where nothing here changes.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from hvdet.comm import mpi_group, world
from hvdet.comm.shm import segment_dir
from hvdet.registry import GROUP_BACKENDS

# Fastest first, per tensor device, as measured by benchmarks/bn_overhead.py (docs/cross_gpu_bn.md).
# CPU, one allreduce of 257 doubles between 2 ranks: shm 11-45 us, mpi4py 8-29 us (only under mpirun;
# in whole CGBN steps 1.02x vs 1.45x local BN at 160 px), Gloo 0.85-1.65 ms, Horovod one 20 ms cycle.
AUTO_ORDER = {"cpu": ("shm", "mpi", "torch", "horovod"), "cuda": ("torch", "horovod")}
_UNAVAILABLE = {"mpi": "backend 'mpi' needs the job launched by mpirun and mpi4py installed",
                "horovod": "backend 'horovod' needs Horovod's world (comm.gradients=horovod)",
                "shm": "backend 'shm' needs every group's ranks on one x86-64 host with a shared {dir}"}

_OPEN: dict[tuple[str, int], object] = {}     # (backend, group size) -> this rank's backend, or None
_GROUPS: dict[int, Group] = {}
# A ContextVar, not a global: each thread starts with its own empty context, so a simulated rank's world
# is seen by its own thread only, and by no real run's code (the default, None, is never replaced there).
_SIMULATED: ContextVar = ContextVar("hvdet_simulated_world", default=None)


@contextlib.contextmanager
def simulated_world(rank_world):
    """On this thread, within the block: collectives go to ``rank_world``, one rank of a world simulated
    in one process (tests/simulated.py). It offers ``rank()``, ``size()``, ``allreduce(tensor, op)`` and
    ``consecutive_groups(group_size)``, whose groups have :class:`Group`'s collectives."""
    token = _SIMULATED.set(rank_world)
    try:
        yield rank_world
    finally:
        _SIMULATED.reset(token)


def simulated():
    """This thread's simulated rank world (:func:`simulated_world`), or None: always None in a real run."""
    return _SIMULATED.get()


def open_backend(name: str, group_size: int):
    """This rank's ``name`` backend for groups of ``group_size`` (opened collectively the first time)."""
    key = (name, group_size)
    if key not in _OPEN:
        _OPEN[key] = GROUP_BACKENDS.load(name).open(group_size)
    return _OPEN[key]


def reset() -> None:
    """Forget every group and opened backend (the next use opens them again, collectively)."""
    _OPEN.clear()
    _GROUPS.clear()
    mpi_group.reset()


@dataclass(eq=False)
class Group:
    """A group of consecutive ranks that this rank belongs to.

    Made by :func:`consecutive_groups`; backends are opened lazily, and collectively: the first
    ``allreduce`` with a given backend must happen on all ranks of the world (every group's members),
    as it does when every rank runs the same model.
    """

    ranks: tuple[int, ...]
    _backends: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This rank's index within the group."""
        return self.ranks.index(world.rank())

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", backend: str = "auto") -> torch.Tensor:
        """Allreduce ``tensor`` over the group's ranks; returns a new tensor (not differentiable)."""
        if self.size == 1:
            return tensor.clone()
        return self._backend(self.resolve_backend(tensor.device, backend, tensor.numel())).allreduce(tensor, op)

    def allgather(self, tensor: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Every group rank's ``tensor`` (same shape on all), stacked in group order: [size, *shape].

        Cross-GPU BN's exact one-collective statistics gather each rank's (count, mean, M2) with it.
        """
        if self.size == 1:
            return tensor.detach().clone()[None]
        return self._backend(self.resolve_backend(tensor.device, backend, tensor.numel())).allgather(tensor)

    def resolve_backend(self, device: torch.device, backend: str = "auto", numel: int = 0) -> str:
        """The backend an op on ``numel`` elements on ``device`` takes (``auto``: the fastest that can
        carry it; the size is the same on every rank, so all ranks pick alike)."""
        if backend != "auto":
            GROUP_BACKENDS[backend]  # an unknown name: ValueError naming the closest
            if self._backend(backend) is None:
                raise RuntimeError(_UNAVAILABLE[backend].format(dir=segment_dir()))
            return backend
        for name in AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]:
            opened = self._backend(name)
            if opened is not None and (opened.max_numel is None or numel <= opened.max_numel):
                return name
        raise AssertionError("unreachable: torch always opens")

    def _backend(self, name: str):
        if name not in self._backends:
            self._backends[name] = open_backend(name, self.size)
        return self._backends[name]


def consecutive_groups(group_size: int | None = None) -> Group:
    """The group of ``group_size`` consecutive ranks holding this rank (None: the whole world).

    Ranks [0, g), [g, 2g), ... form the groups, as in MegDet, so that on a node of 8 GPUs a group of
    8 stays inside the node. ``group_size`` must divide the world size.
    """
    if (sim := _SIMULATED.get()) is not None:
        return sim.consecutive_groups(group_size)
    n = world.size()
    group_size = checked_group_size(group_size, n)
    if group_size not in _GROUPS:
        first = world.rank() // group_size * group_size
        _GROUPS[group_size] = Group(tuple(range(first, first + group_size)))
    return _GROUPS[group_size]


def checked_group_size(group_size: int | None, world_size: int) -> int:
    """``group_size`` as an int (None: the whole world); ValueError unless it is >= 1 and divides ``world_size``."""
    group_size = world_size if group_size is None else int(group_size)
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"group size {group_size} must be >= 1 and divide the world size {world_size}")
    return group_size


def allreduce_small(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    """A latency-bound world allreduce of a few values that every step waits for (the loss check).

    CPU tensors take the group path (shared memory on one host: microseconds) instead of Horovod,
    which answers after its next background cycle (5-20 ms on CPU hosts, see
    horovod_env.horovod_defaults). CUDA tensors keep Horovod: a NCCL world made only for this would
    cost more than it saves. A simulated rank's tensors (:func:`simulated_world`) take its groups
    whatever their device.
    """
    if tensor.device.type == "cpu" or _SIMULATED.get() is not None:
        return consecutive_groups(None).allreduce(tensor, op)
    return world.allreduce(tensor, op, name)



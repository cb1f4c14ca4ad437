"""N ranks as N threads of one process: the distributed math in the fast tests, without a launcher.

    results = run_in_threads(lambda w: case(w.rank(), w.size()), n=4)   # [rank 0's result, ..., rank 3's]

Each thread is one rank. It enters :func:`hvdet.comm.groups.simulated_world` with its :class:`RankWorld`,
so on that thread ``comm.consecutive_groups`` (Cross-GPU BN's statistics), ``comm.allreduce_small`` (the
loss check) and AGVM's collectives reach the simulated groups here instead of Horovod, MPI, Gloo or
shared memory. A collective meets the group's other threads at a ``threading.Barrier`` and reduces their
tensors in rank order, so every rank gets bitwise the same result, as from the real backends. CPU autograd
runs backward on the thread that calls it, so CGBN's backward collective runs on its rank's thread too.

Not simulated (the launcher tests in ``make test`` cover them): separate processes (torch's global RNG and
other globals are shared: seed generators, not the global one), transports and their timing, Horovod's
DistributedOptimizer (average ``p.grad`` with :meth:`RankWorld.allreduce` instead), CUDA.
"""
from __future__ import annotations

import threading

import torch

from hvdet.comm import groups
from tests.launches import hook_launches

# op -> how two ranks' tensors combine; "mean" divides the rank-order sum by the group size, as every backend does.
_COMBINE = {"sum": torch.add, "mean": torch.add, "max": torch.maximum, "min": torch.minimum}


class RankAborted(RuntimeError):
    """Raised in a rank's pending or next collective after another rank failed, so it does not wait out
    the barrier's timeout; :func:`run_in_threads` reports the failure that caused it instead."""


class SimulatedWorld:
    """What the N rank threads share: one meeting place (a barrier and a slot per rank) per group."""

    def __init__(self, size: int, timeout_s: float):
        self.size, self.timeout_s, self.aborted = size, timeout_s, False
        self._meetings: dict[tuple[int, ...], tuple[threading.Barrier, list]] = {}
        self._lock = threading.Lock()  # the first rank of a group to arrive makes its meeting place

    def meeting(self, ranks: tuple[int, ...]) -> tuple[threading.Barrier, list]:
        with self._lock:
            if self.aborted:  # checked under the lock: no barrier is made after abort() broke them all
                raise RankAborted("another simulated rank failed")
            if ranks not in self._meetings:
                self._meetings[ranks] = (threading.Barrier(len(ranks), timeout=self.timeout_s), [None] * len(ranks))
            return self._meetings[ranks]

    def abort(self) -> None:
        """Release every rank waiting in a collective (a rank failed: they would wait for it in vain)."""
        with self._lock:
            self.aborted = True
            for barrier, _ in self._meetings.values():
                barrier.abort()


class RankWorld:
    """One simulated rank's view of the world: the part of ``hvdet.comm`` the distributed math calls."""

    def __init__(self, world: SimulatedWorld, rank: int):
        self.world, self._rank = world, rank
        self._groups: dict[int, SimulatedGroup] = {}
        self.collectives = 0  # group collectives this rank made (world allreduces included)

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.world.size

    def consecutive_groups(self, group_size: int | None = None) -> SimulatedGroup:
        """As ``comm.consecutive_groups``: the group of ``group_size`` consecutive ranks holding this rank."""
        size = groups.checked_group_size(group_size, self.world.size)  # the same ValueError as a real run's
        if size not in self._groups:
            first = self._rank // size * size
            self._groups[size] = SimulatedGroup(tuple(range(first, first + size)), self)
        return self._groups[size]

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
        """As ``comm.allreduce`` (Horovod's world allreduce): over every simulated rank."""
        return self.consecutive_groups(None).allreduce(tensor, op)

    def counted(self, fn):
        """``(fn(), the number of group collectives it made on this rank)``."""
        before = self.collectives
        out = fn()
        return out, self.collectives - before


class SimulatedGroup:
    """:class:`hvdet.comm.Group`'s collectives (``allreduce``, ``allgather``) for one simulated rank."""

    def __init__(self, ranks: tuple[int, ...], owner: RankWorld):
        self.ranks, self._owner = ranks, owner

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This rank's index within the group."""
        return self.ranks.index(self._owner.rank())

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", backend: str = "auto") -> torch.Tensor:
        if op not in _COMBINE:
            raise ValueError(f"op must be one of {tuple(_COMBINE)}, got {op!r}")
        parts = self._exchange(("allreduce", op), tensor)
        out = parts[0]
        for part in parts[1:]:  # rank order, the same on every rank: bitwise equal results
            out = _COMBINE[op](out, part)
        return out / len(parts) if op == "mean" else out.clone()  # one rank: out is still the shared slot

    def allgather(self, tensor: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return torch.stack(self._exchange(("allgather",), tensor))

    def resolve_backend(self, device: torch.device, backend: str = "auto", numel: int = 0) -> str:
        return "simulated"

    def _exchange(self, call: tuple, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every group rank's ``tensor`` in group order, after checking they all made the same call."""
        self._owner.collectives += 1
        barrier, slots = self._owner.world.meeting(self.ranks)
        slots[self.rank] = (call, tuple(tensor.shape), tensor.dtype, tensor.detach().clone())
        self._wait(barrier, call)
        calls, parts = [s[:3] for s in slots], [s[3] for s in slots]
        # Second meeting: no rank may fill its slot for the next collective before all have read this one's.
        self._wait(barrier, call)
        if len(set(calls)) > 1:  # a real backend would hang or mix tensors up; every rank raises alike here
            raise RuntimeError(f"simulated ranks {self.ranks} made different collectives (rank: call, shape, dtype): "
                               + "; ".join(f"{r}: {c}" for r, c in zip(self.ranks, calls, strict=True)))
        return parts

    def _wait(self, barrier: threading.Barrier, call: tuple) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            if self._owner.world.aborted:
                raise RankAborted(f"simulated rank {self._owner.rank()}: another rank failed") from None
            raise RuntimeError(f"simulated rank {self._owner.rank()}: the ranks {self.ranks} did not all reach "
                               f"{call[0]} within {self._owner.world.timeout_s} s (does every rank of the group "
                               "make the same collectives, in the same order?)") from None


def run_in_threads(fn, n: int, timeout_s: float = 30.0) -> list:
    """``fn(rank_world)`` on ``n`` simulated ranks, one thread each; their results in rank order.

    When a rank raises, the others are released from their collectives (:class:`RankAborted`) and, once
    every thread has ended, the first failure that is not such a release is raised again, noting its
    rank. ``timeout_s``: how long a collective waits for the group's other ranks before failing.
    """
    world = SimulatedWorld(n, timeout_s)
    results, errors = [None] * n, []

    def rank_main(rank: int) -> None:
        try:
            with groups.simulated_world(RankWorld(world, rank)) as rank_world:
                results[rank] = fn(rank_world)
        except BaseException as err:  # noqa: BLE001 - re-raised on the calling thread below
            errors.append((rank, err))
            world.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"simulated-rank-{r}", daemon=True)
               for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        rank, err = next((e for e in errors if not isinstance(e[1], RankAborted)), errors[0])
        err.add_note(f"(raised on simulated rank {rank} of {n})")
        raise err
    return results


_TRITON_LOCK = threading.Lock()


def serialize_triton_launches(monkeypatch, module) -> None:
    """Make ``module``'s Triton launches one at a time across the simulated ranks' threads: Triton's
    interpreter patches ``triton.language`` for the duration of a launch, so two threads interpreting
    kernels at once break each other ("Did you forget to add @triton.jit?"). Compiled kernels on a GPU
    have no such limit; the lock is the tests'."""
    def one_at_a_time(_name, kernel, grid, args, kwargs):
        with _TRITON_LOCK:
            return kernel[grid](*args, **kwargs)
    hook_launches(monkeypatch, module, one_at_a_time)

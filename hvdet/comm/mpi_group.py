"""Group backend ``mpi``: an mpi4py communicator split from COMM_WORLD, only when launched by mpirun.

CPU tensors; 8-29 us for an allreduce of 257 doubles between 2 ranks here (docs/cross_gpu_bn.md).
"""
from __future__ import annotations

import os

import torch

from hvdet.comm import world

_AVAILABLE: bool | None = None


def mpi_available() -> bool:
    """mpi4py usable alongside Horovod: launched by mpirun, and Horovod runs on MPI (cached)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = False
        if "OMPI_COMM_WORLD_SIZE" in os.environ and world.gradients() == "horovod" and world.is_initialized() \
                and world.horovod_available() and world.hvd.mpi_enabled():
            try:
                from mpi4py import MPI
                _AVAILABLE = MPI.COMM_WORLD.Get_size() == world.size()
            except ImportError:
                pass
    return _AVAILABLE


def reset() -> None:
    global _AVAILABLE
    _AVAILABLE = None


class MPIBackend:
    name = "mpi"
    max_numel = None

    def __init__(self, comm, group_size: int):
        self.comm, self.size = comm, group_size

    @classmethod
    def open(cls, group_size: int) -> MPIBackend | None:
        """Collective over the world (COMM_WORLD.Split); None, on every rank alike, without mpirun."""
        if not mpi_available():
            return None
        from mpi4py import MPI
        return cls(MPI.COMM_WORLD.Split(color=world.rank() // group_size, key=world.rank()), group_size)

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        from mpi4py import MPI
        _check_cpu(tensor)
        out = tensor.detach().clone().contiguous()
        mpi_op = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        self.comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=mpi_op)
        if op == "mean":
            out /= self.size
        return out

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        _check_cpu(tensor)
        out = torch.empty(self.size, *tensor.shape, dtype=tensor.dtype)
        self.comm.Allgather(tensor.detach().contiguous().numpy(), out.numpy())
        return out


def _check_cpu(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cpu":
        raise RuntimeError("the mpi group backend takes CPU tensors; use backend='torch' (NCCL) on GPU")

"""Group backend ``horovod``: a Horovod process set per group.

Every op waits for Horovod's background negotiation cycle, which is what makes ``hvd.SyncBatchNorm``
slow (horovod issue 2450); it is the backend that works wherever Horovod does.
"""
from __future__ import annotations

import torch

from hvdet.comm import world


class HorovodBackend:
    name = "horovod"
    max_numel = None  # any size

    def __init__(self, process_set, group_size: int):
        self.process_set, self.size = process_set, group_size

    @classmethod
    def open(cls, group_size: int) -> HorovodBackend | None:
        """Collective over the world: every rank adds every group's process set, in the same order.
        None under comm.gradients=ddp, whose world has no Horovod."""
        if world.gradients() != "horovod":
            return None
        hvd = world.hvd
        n = world.size()
        if group_size == n:
            return cls(hvd.global_process_set, group_size)
        sets = [hvd.add_process_set(list(range(s, s + group_size))) for s in range(0, n, group_size)]
        return cls(sets[world.rank() // group_size], group_size)

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return world.hvd.allreduce(tensor, op=world.OPS[op], process_set=self.process_set)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return world.hvd.allgather(tensor.detach()[None].contiguous(), process_set=self.process_set)

"""Group backend ``torch``: a torch.distributed group per group, set up from Horovod's ranks.

NCCL for CUDA tensors, Gloo for CPU tensors; it talks to the library directly, with no background
cycle, so it is the GPU default (Horovod's process sets wait for a negotiation cycle per op).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch

from hvdet.comm import world

_TORCH_OPS = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
              "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}


class TorchBackend:
    name = "torch"
    max_numel = None

    def __init__(self, group, group_size: int):
        self.group, self.size = group, group_size  # group None: the default (whole-world) group

    @classmethod
    def open(cls, group_size: int) -> TorchBackend:
        """Collective over the world: every rank creates every group, in the same order."""
        init_torch_distributed()
        n = world.size()
        if group_size == n:
            return cls(None, group_size)
        groups = [torch.distributed.new_group(list(range(s, s + group_size))) for s in range(0, n, group_size)]
        return cls(groups[world.rank() // group_size], group_size)

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        out = tensor.clone()
        with _timeouts_as_stalls(self.size):
            torch.distributed.all_reduce(out, op=_TORCH_OPS[op], group=self.group)
        if op == "mean":
            out /= self.size
        return out

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        with _timeouts_as_stalls(self.size):
            torch.distributed.all_gather(parts, tensor.detach().contiguous(), group=self.group)
        return torch.stack(parts)


@contextlib.contextmanager
def _timeouts_as_stalls(group_size: int):
    """Gloo's "Timed out waiting 10000ms for recv" (a RuntimeError) is the stall policy's time-out:
    a TimeoutError, so the rank exits as stalled (exit code 3) like one whose Horovod op timed out,
    whichever backend its BN group took (a group across hosts takes this one)."""
    try:
        yield
    except RuntimeError as err:
        if "Timed out" not in str(err):
            raise
        first = world.rank() // group_size * group_size
        raise TimeoutError(f"a group collective (torch.distributed, ranks {first}-{first + group_size - 1}) waited "
                           f"comm.timeout_s={world.timeout_s():g} for a peer: {str(err).splitlines()[0]}") from err


def init_torch_distributed() -> None:
    """A torch.distributed world with Horovod's ranks: Gloo for CPU tensors, NCCL for CUDA ones
    (under comm.gradients=ddp the world is torch.distributed's already: its groups are made in it)."""
    if torch.distributed.is_initialized():
        return
    world.check_init()
    # Rank 0 picks the rendezvous address and a free port; Horovod tells everyone else.
    addr = None
    if world.rank() == 0:
        single_host = world.local_size() == world.size()
        host = os.environ.get("HVDET_MASTER_ADDR") or (
            "127.0.0.1" if single_host else socket.gethostbyname(socket.gethostname()))
        if host.startswith("127.") and not single_host:
            # Debian maps the hostname to 127.0.1.1: other nodes would dial themselves and hang.
            addr = RuntimeError(f"rank 0's hostname resolves to {host}, which other nodes cannot reach; "
                                "set HVDET_MASTER_ADDR to rank 0's address on the cluster network")
        if addr is None:
            with socket.socket() as sock:
                sock.bind(("", 0))
                addr = f"tcp://{host}:{sock.getsockname()[1]}"
    addr = world.broadcast_object(addr, root_rank=0)  # the error too, so every rank raises instead of hanging
    if isinstance(addr, Exception):
        raise addr
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, init_method=addr, rank=world.rank(), world_size=world.size(),
                                         timeout=datetime.timedelta(seconds=world.timeout_s()))

"""Communication: everything distributed in hvdet goes through this package, so the rest of the code
reads like single-process PyTorch.

* :mod:`hvdet.comm.world`: the world of ranks over Horovod (init, rank/size, gradient averaging,
  broadcasts, gathers); the only module in hvdet that imports Horovod. Under ``comm.gradients: ddp``
  (torchrun) the same calls run over torch.distributed, gradients averaged by DistributedDataParallel
  (:mod:`hvdet.comm.torch_world`).
* :mod:`hvdet.comm.groups`: collectives over groups of consecutive ranks (Cross-GPU BN, AGVM), with
  one module per backend: ``horovod_group``, ``torch_group``, ``mpi_group``, ``shm``; and the hook through
  which the fast tests simulate ranks as threads (``groups.simulated_world``, tests/simulated.py).

The names below are the API; ``from hvdet import comm; comm.init(); comm.allreduce(t)``.
"""
from hvdet.comm.groups import AUTO_ORDER, Group, allreduce_small, consecutive_groups, reset
from hvdet.comm.mpi_group import mpi_available
from hvdet.comm.world import (
    OPS,
    HorovodUnavailableError,
    allgather_object,
    allreduce,
    barrier,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
    build_info,
    controller,
    device,
    distributed_optimizer,
    elastic_launch,
    gather_object,
    gradients,
    grouped_allreduce,
    horovod_available,
    init,
    is_horovod_error,
    is_initialized,
    is_main_process,
    is_peer_loss,
    local_rank,
    local_size,
    rank,
    shutdown,
    size,
    timeline,
    timeout_s,
)
from hvdet.registry import GROUP_BACKENDS

__all__ = ["AUTO_ORDER", "GROUP_BACKENDS", "OPS", "Group", "HorovodUnavailableError", "allgather_object",
           "allreduce", "allreduce_small", "barrier", "broadcast_object", "broadcast_optimizer_state",
           "broadcast_parameters", "build_info", "consecutive_groups", "controller", "device",
           "distributed_optimizer", "elastic_launch", "gather_object", "gradients", "grouped_allreduce",
           "horovod_available", "init", "is_horovod_error", "is_initialized", "is_main_process", "is_peer_loss",
           "local_rank", "local_size", "mpi_available", "rank", "reset", "shutdown", "size", "timeline", "timeout_s"]

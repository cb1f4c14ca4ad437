"""The world of ranks over torch.distributed, for ``comm.gradients: ddp`` (launched by ``torchrun``).

:mod:`hvdet.comm.world` sends every world call here once ``comm.init(gradients="ddp")`` chose this
path; nothing here imports Horovod, so the path also works where Horovod is not installed.

* ``torchrun --nproc_per_node N train.py ...``: ``env://`` rendezvous from the variables torchrun sets
  (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
* one plain process: a world of one (an in-memory store, no port), as ``torchrun --nproc_per_node 1``.

Gloo carries CPU tensors, NCCL CUDA ones (``cpu:gloo,cuda:nccl`` on GPU hosts, so that the pickled
objects of the object collectives stay on the CPU). Every collective gives up after ``comm.timeout_s``
(the process group's time-out). Gradients are averaged by torch's DistributedDataParallel:
:func:`distributed_optimizer` returns the optimizer with Horovod's DistributedOptimizer protocol
(``synchronize``, ``skip_synchronize``, ``backward_passes_per_step``) and the DDP wrapper that the
forward must run through (``forward_pass``), so :mod:`hvdet.step` has no DDP branch.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# Set by torchrun (TORCHELASTIC_RUN_ID) or by any env:// launcher (the other four); horovodrun and mpirun set none.
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def launched() -> bool:
    """True when torchrun (or another ``env://`` launcher) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in _TORCHRUN_KEYS)


def init(timeout_s: float) -> None:
    """The torch.distributed world (idempotent): torchrun's ranks, or a world of one."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())  # before NCCL sees the device
    if launched():
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # nothing to meet: an in-memory store, no port to pick
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def is_initialized() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def local_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def controller() -> str:
    """How the ranks talk: torch.distributed's backend ('gloo', or 'cpu:gloo,cuda:nccl' on GPU hosts)."""
    return str(dist.get_backend())


def build_info() -> dict:
    return {"gloo": dist.is_gloo_available(), "mpi": dist.is_mpi_available(), "nccl": dist.is_nccl_available(),
            "cuda": torch.cuda.is_available()}


# ---------------------------------------------------------------------------------------------
# World collectives (torch.distributed), with Horovod's semantics: new tensors, mean = sum / size
# ---------------------------------------------------------------------------------------------

def allreduce(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    out = tensor.clone()
    if size() == 1:
        return out
    dist.all_reduce(out, op=_OPS[op])
    if op == "mean":
        out /= size()
    return out


def allgather_object(obj) -> list:
    if size() == 1:
        return [obj]
    out = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, root_rank: int = 0) -> list | None:
    if size() == 1:
        return [obj]
    out = [None] * size() if rank() == root_rank else None
    dist.gather_object(obj, out, dst=root_rank)
    return out


def broadcast_object(obj, root_rank: int = 0):
    if size() == 1:
        return obj
    box = [obj if rank() == root_rank else None]
    dist.broadcast_object_list(box, src=root_rank)
    return box[0]


def broadcast_parameters(state, root_rank: int = 0) -> None:
    """Root's tensors in place on every rank; ``state`` a state_dict or (name, tensor) pairs (sorted
    by name, as Horovod does, so that every rank sends the same sequence)."""
    if size() == 1:
        return
    items = sorted(state.items() if isinstance(state, dict) else state, key=lambda kv: kv[0])
    works = [dist.broadcast(t.data, src=root_rank, async_op=True) for _, t in items if torch.is_tensor(t)]
    for work in works:
        work.wait()


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Root's optimizer state (moments, step counters, hyper-parameters) on every rank, via the CPU
    (``load_state_dict`` moves each tensor to its parameter's device)."""
    if size() == 1:
        return
    state = _to_cpu(optimizer.state_dict()) if rank() == root_rank else None
    optimizer.load_state_dict(broadcast_object(state, root_rank))


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(message: str) -> Exception:
    """The error for "a peer is gone": torch.distributed's own backend error."""
    return dist.DistBackendError(message)


def is_peer_loss(err: BaseException) -> bool:
    """``err`` says a peer died or a collective timed out (torch.distributed's errors for it)."""
    if isinstance(err, dist.DistError):
        return not isinstance(err, dist.DistStoreError)  # a store error is the rendezvous's, at start-up
    # Gloo's transport errors reach Python as plain RuntimeErrors (e.g. from DDP's backward).
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_LOSS)


# ---------------------------------------------------------------------------------------------
# Gradient averaging: DistributedDataParallel behind Horovod's DistributedOptimizer protocol
# ---------------------------------------------------------------------------------------------

class _DDPGradients:
    """Mixed into the optimizer's own class (as Horovod mixes its DistributedOptimizer in): the same
    optimizer (param_groups, state, state_dict, what GradScaler and AGVM use), plus:

    * ``forward_pass(last)``: a context giving the module a pass's forward must call, DDP's wrapper
      of the model (DDP arms its backward hooks in forward); on all but the last of
      ``backward_passes_per_step`` passes it is DDP's ``no_sync()``, so gradients accumulate locally
      and the last backward averages their sum, as Horovod's ``backward_passes_per_step`` does;
    * ``synchronize()``: nothing to wait for, DDP's backward returns after its allreduces
      (its reducer finalizes in the autograd engine's final callback);
    * ``skip_synchronize()``: a no-op context, as ``step()`` never communicates here.
    """

    def forward_pass(self, last: bool = True):
        return contextlib.nullcontext(self.ddp) if last else _no_sync(self.ddp)

    def synchronize(self) -> None:
        pass

    def skip_synchronize(self):
        return contextlib.nullcontext()


@contextlib.contextmanager
def _no_sync(ddp):
    with ddp.no_sync():
        yield ddp


def distributed_optimizer(optimizer: torch.optim.Optimizer, named_parameters=None, *, compression: str = "none",
                          backward_passes_per_step: int = 1, op: str = "mean", model: torch.nn.Module | None = None):
    """``optimizer`` with ``model``'s gradients averaged over the ranks by DistributedDataParallel.

    DDP's choices, each for Horovod's semantics: ``forward_sync_buffers=False`` (Horovod never
    broadcasts buffers during training: BN running statistics stay each rank's, or CGBN's group's);
    ``find_unused_parameters=False`` (every trainable parameter of hvdet's detectors gets a gradient
    in training, checked for the R-CNNs and RetinaNet, also with an image without boxes; DDP raises
    at the next iteration otherwise); gradients copied out of the buckets (``p.grad`` stays the
    parameter's own tensor, which ``zero_grad(set_to_none=True)`` and AGVM's hooks expect). DDP
    scales each gradient by 1/size before its sum where Horovod divides the sum: the same mean, and
    bit for bit on 2 ranks (a power of two). ``compression="fp16"``: torch's fp16 compression hook.
    ``named_parameters`` is unused (DDP takes the model's); the model keeps its own state_dict keys.
    """
    if model is None:
        raise ValueError("comm.gradients=ddp averages through DistributedDataParallel, which wraps the model: "
                         "pass model= to distributed_optimizer")
    if op != "mean":
        raise ValueError(f"comm.gradients=ddp averages gradients (op='mean'); got op={op!r}")
    if compression not in ("none", "fp16"):
        raise ValueError(f"compression must be one of ['fp16', 'none'], got {compression!r}")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    device = next(model.parameters()).device
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=False)
    if compression == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    cls = type(type(optimizer).__name__, (_DDPGradients, type(optimizer)), {})
    wrapped = cls.__new__(cls)
    wrapped.__dict__ = optimizer.__dict__  # the same optimizer, as Horovod's wrapper shares its state
    wrapped.ddp, wrapped.backward_passes_per_step = ddp, backward_passes_per_step
    return wrapped

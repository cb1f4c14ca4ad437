"""Communication layer: the only module in hvdet that imports Horovod (and mpi4py / torch.distributed).

Everything distributed in hvdet goes through here, so the rest of the code reads like single-process
PyTorch. The same calls work in three settings:

* one plain process (``python train.py``): Horovod is initialized as a world of size 1 (where
  Horovod is not installed, a world of one without it: the kernels, CGBN's group path and the GPU
  check run; Horovod's optimizer wrapper, and with it training, raise HorovodUnavailableError);
* ``horovodrun -np N`` (Gloo or MPI controller) and ``mpirun -np N``;
* a laptop CPU, where Gloo/MPI carry the tensors, or a DGX node, where NCCL does.

World collectives (gradient averaging, metric reduction, broadcasts) use Horovod. Collectives over
*groups of consecutive ranks* (Cross-GPU BatchNorm, AGVM's half-world means) go through
:class:`Group`, which has several backends because their latency decides the cost of a BN layer:

* ``"horovod"``: a Horovod process set. Every op waits for Horovod's background negotiation cycle,
  which is what makes ``hvd.SyncBatchNorm`` slow (horovod issue 2450).
* ``"torch"``: a torch.distributed group set up from Horovod's rank and size; NCCL for CUDA tensors,
  Gloo for CPU tensors. Talks to the library directly, no background cycle.
* ``"mpi"``: an mpi4py communicator split from COMM_WORLD; only when launched by ``mpirun``.
* ``"shm"``: a shared-memory segment per group (:mod:`hvdet.shm`), when every group's ranks share
  one x86-64 host; CPU tensors of up to 8192 elements. Microseconds, under any launcher.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch

from hvdet import shm

_FIX = ("run `make venv` in the hvdet checkout (or `PYTHON=<your python> launch/build_horovod.sh`), "
        "which builds Horovod 0.28.1 with PyTorch, Gloo and MPI support")


class HorovodUnavailableError(ImportError):
    """Horovod is missing or unusable; the message says what to run."""


def _import_horovod():
    try:
        import horovod
    except ImportError as err:
        raise HorovodUnavailableError(f"hvdet needs Horovod, which is not installed ({err}); {_FIX}") from err
    try:
        import horovod.torch as hvd_torch
    except (ImportError, OSError) as err:
        # A Horovod built before torch was installed (or against another torch) has no working
        # horovod.torch extension; pip then happily reports it installed.
        raise HorovodUnavailableError(
            f"Horovod {getattr(horovod, '__version__', '?')} is installed but its PyTorch extension does not "
            f"load ({err}); it was built without PyTorch or against another torch version; {_FIX}") from err
    return hvd_torch


try:
    hvd = _import_horovod()
    OPS = {"sum": hvd.Sum, "mean": hvd.Average, "max": hvd.Max, "min": hvd.Min}
    _COMPRESSION = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}
    _HOROVOD_ERROR: HorovodUnavailableError | None = None
except HorovodUnavailableError as _err:
    # One plain process still works without Horovod (a world of one: CGBN groups of one, the
    # optimizers, the kernels, evaluation), e.g. on a GPU box that only checks kernels. Anything that
    # needs other ranks, or Horovod's optimizer wrapper, raises this error with the fix.
    hvd, OPS, _COMPRESSION, _HOROVOD_ERROR = None, {}, {"none": None, "fp16": None}, _err
_SINGLE = False  # initialized as a world of one without Horovod


def horovod_available() -> bool:
    return hvd is not None


def _need_horovod(what: str):
    if hvd is None:
        raise HorovodUnavailableError(f"{what} needs Horovod: {_HOROVOD_ERROR}") from _HOROVOD_ERROR
    return hvd


def _launched() -> bool:
    """True when a launcher (horovodrun, mpirun, srun) started this process."""
    keys = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
    return any(k in os.environ for k in keys)


def init() -> None:
    """Initialize Horovod (idempotent). Dynamic process sets are enabled so groups can be made later.

    Without Horovod, a process that no launcher started becomes a world of one; a launched one raises.
    """
    global _SINGLE
    if hvd is None:
        if _launched():
            _need_horovod("a job started by horovodrun/mpirun")
        _SINGLE = True
        return
    if hvd.is_initialized():
        return
    if not _launched():
        # A plain process: OpenMPI's singleton init refuses to run as root without these.
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if not torch.cuda.is_available():
        # Horovod's background thread negotiates every cycle (1 ms by default) even with nothing to
        # send. On a CPU host that thread shares the cores with the math: at 1 ms it made a 2-rank
        # ResNet-50 step 55% slower than one process, at 20 ms 10% (docs/cross_gpu_bn.md). An op
        # waits at most one cycle longer; the user's own setting wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "20")
    hvd.init(process_sets="dynamic")
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())


def is_initialized() -> bool:
    return _SINGLE if hvd is None else hvd.is_initialized()


def _hvd_up() -> bool:
    return hvd is not None and hvd.is_initialized()


def _check_init() -> None:
    if not is_initialized():
        raise RuntimeError("hvdet.comm.init() must be called first")


def rank() -> int:
    return hvd.rank() if _hvd_up() else 0


def size() -> int:
    return hvd.size() if _hvd_up() else 1


def local_rank() -> int:
    return hvd.local_rank() if _hvd_up() else 0


def local_size() -> int:
    return hvd.local_size() if _hvd_up() else 1


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its local GPU when CUDA is present, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def controller() -> str:
    """'mpi' or 'gloo': how Horovod's ranks talk to each other."""
    _check_init()
    return "mpi" if _need_horovod("controller()").mpi_enabled() else "gloo"


def build_info() -> dict:
    hvd = _need_horovod("build_info()")
    return {"gloo": hvd.gloo_built(), "mpi": hvd.mpi_built(), "nccl": hvd.nccl_built(),
            "cuda": hvd.cuda_built()}


# ---------------------------------------------------------------------------------------------
# World collectives (Horovod)
# ---------------------------------------------------------------------------------------------

def allreduce(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    """Allreduce over all ranks; returns a new tensor. op: sum | mean | max | min."""
    if size() == 1:
        return tensor.clone()
    return hvd.allreduce(tensor, name=name, op=OPS[op])


def allreduce_small(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    """A latency-bound world allreduce of a few values that every step waits for (the loss check).

    CPU tensors take the group path (shared memory on one host: microseconds) instead of Horovod,
    which answers after its next background cycle (20 ms on CPU hosts, see init). CUDA tensors keep
    Horovod: a NCCL world made only for this would cost more than it saves.
    """
    if tensor.device.type == "cpu":
        return consecutive_groups(None).allreduce(tensor, op)
    return allreduce(tensor, op, name)


def allgather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    if size() == 1:
        return [obj]
    # An explicit name, as in broadcast_object: ranks passing objects of different types (None and a
    # str, say) would otherwise submit differently named collectives that never match.
    return hvd.allgather_object(obj, name="hvdet.allgather_object")


def broadcast_object(obj, root_rank: int = 0):
    """Root's ``obj`` on every rank (pickled); the others may pass anything, e.g. None."""
    if size() == 1:
        return obj
    # An explicit name: Horovod's default is type(obj).__name__, which differs between the root's
    # object and the others' placeholders, and collectives with different names never match (hang).
    return hvd.broadcast_object(obj, root_rank=root_rank, name="hvdet.broadcast_object")


def broadcast_parameters(state, root_rank: int = 0) -> None:
    """Overwrite every rank's parameters/buffers (a state_dict or named_parameters) with root's."""
    if size() > 1:
        hvd.broadcast_parameters(state, root_rank=root_rank)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Root's optimizer state (moments, step counters, hyper-parameters) on every rank."""
    if size() > 1:
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)


def barrier() -> None:
    if size() > 1:
        hvd.barrier()


def distributed_optimizer(optimizer: torch.optim.Optimizer, named_parameters, *, compression: str = "none",
                          backward_passes_per_step: int = 1, op: str = "mean"):
    """Wrap ``optimizer`` so ``step()`` applies gradients ring-allreduced over all ranks.

    Gradients are allreduced asynchronously as backward produces them; ``synchronize()`` waits for
    them (call it before clipping, then step inside ``skip_synchronize()``).
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
    hvd = _need_horovod("distributed_optimizer (hvdet's training loop)")
    return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                    compression=_COMPRESSION[compression],
                                    backward_passes_per_step=backward_passes_per_step, op=OPS[op])


def shutdown() -> None:
    if _hvd_up():
        hvd.shutdown()


# ---------------------------------------------------------------------------------------------
# Groups of consecutive ranks
# ---------------------------------------------------------------------------------------------

GROUP_BACKENDS = ("horovod", "torch", "mpi", "shm")
# Fastest first, per tensor device, as measured by benchmarks/bn_overhead.py (docs/cross_gpu_bn.md).
# CPU, one allreduce of 257 doubles between 2 ranks: shm 11-45 us, mpi4py 8-29 us (only under mpirun;
# in whole CGBN steps 1.02x vs 1.45x local BN at 160 px), Gloo 0.85-1.65 ms, Horovod one 20 ms cycle.
AUTO_ORDER = {"cpu": ("shm", "mpi", "torch", "horovod"), "cuda": ("torch", "horovod")}


@dataclass(eq=False)
class Group:
    """A group of consecutive ranks that this rank belongs to.

    Made collectively by :func:`consecutive_groups`; the backend handles are made lazily, and
    collectively too: the first ``allreduce`` with a given backend must happen on all ranks of the
    world (every group's members), as it does when every rank runs the same model.
    """

    ranks: tuple[int, ...]
    group_size: int
    _handles: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This rank's index within the group."""
        return self.ranks.index(rank())

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", backend: str = "auto") -> torch.Tensor:
        """Allreduce ``tensor`` over the group's ranks; returns a new tensor (not differentiable)."""
        if self.size == 1:
            return tensor.clone()
        backend = self.resolve_backend(tensor.device, backend, tensor.numel())
        handle = self._handle(backend)
        if backend == "shm":
            return handle.allreduce(tensor, op)
        if backend == "horovod":
            return hvd.allreduce(tensor, op=OPS[op], process_set=handle)
        if backend == "torch":
            out = tensor.clone()
            torch.distributed.all_reduce(out, op=_TORCH_OPS[op], group=handle)
            if op == "mean":
                out /= self.size
            return out
        return _mpi_allreduce(tensor, op, handle, self.size)

    def allgather(self, tensor: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Every group rank's ``tensor`` (same shape on all), stacked in group order: [size, *shape].

        Cross-GPU BN's exact one-collective statistics gather each rank's (count, mean, M2) with it.
        """
        if self.size == 1:
            return tensor.detach().clone()[None]
        backend = self.resolve_backend(tensor.device, backend, tensor.numel())
        handle = self._handle(backend)
        if backend == "shm":
            return handle.allgather(tensor)
        if backend == "horovod":
            return hvd.allgather(tensor.detach()[None].contiguous(), process_set=handle)
        if backend == "torch":
            parts = [torch.empty_like(tensor) for _ in range(self.size)]
            torch.distributed.all_gather(parts, tensor.detach().contiguous(), group=handle)
            return torch.stack(parts)
        return _mpi_allgather(tensor, handle, self.size)

    def resolve_backend(self, device: torch.device, backend: str = "auto", numel: int = 0) -> str:
        """The backend an allreduce of ``numel`` elements on ``device`` takes (``auto``: the fastest that
        can carry it; the size is the same on every rank, so all ranks pick alike)."""
        if backend != "auto":
            if backend not in GROUP_BACKENDS:
                raise ValueError(f"backend must be 'auto' or one of {GROUP_BACKENDS}, got {backend!r}")
            if backend == "mpi" and not mpi_available():
                raise RuntimeError("backend 'mpi' needs the job launched by mpirun and mpi4py installed")
            if backend == "shm" and not self._shm_available():
                raise RuntimeError("backend 'shm' needs every group's ranks on one x86-64 host with a shared "
                                   f"{shm.segment_dir()}")
            return backend
        for name in AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]:
            if name == "mpi" and not mpi_available():
                continue
            if name == "shm" and (numel > shm.CAPACITY or not self._shm_available()):
                continue
            return name
        raise AssertionError("unreachable")

    def _shm_available(self) -> bool:
        # Collective the first time (every rank asks at its first auto allreduce); cached after.
        return self._handle("shm") is not None

    def _handle(self, backend: str):
        if backend not in self._handles:
            self._handles[backend] = _make_handles(backend, self.group_size)[self.ranks[0] // self.group_size]
        return self._handles[backend]


_GROUPS: dict[int, Group] = {}
_HANDLES: dict[tuple[str, int], list] = {}


def consecutive_groups(group_size: int | None = None) -> Group:
    """The group of ``group_size`` consecutive ranks holding this rank (None: the whole world).

    Ranks [0, g), [g, 2g), ... form the groups, as in MegDet, so that on a node of 8 GPUs a group of
    8 stays inside the node. ``group_size`` must divide the world size.
    """
    world = size()
    group_size = world if group_size is None else int(group_size)
    if group_size < 1 or world % group_size:
        raise ValueError(f"group size {group_size} must be >= 1 and divide the world size {world}")
    if group_size not in _GROUPS:
        first = rank() // group_size * group_size
        _GROUPS[group_size] = Group(tuple(range(first, first + group_size)), group_size)
    return _GROUPS[group_size]


def _make_handles(backend: str, group_size: int) -> list:
    """One backend handle per group (collective over the whole world, same order on every rank)."""
    key = (backend, group_size)
    if key not in _HANDLES:
        world = size()
        all_ranks = [list(range(s, s + group_size)) for s in range(0, world, group_size)]
        if backend == "horovod":
            handles = [hvd.global_process_set if group_size == world else hvd.add_process_set(r)
                       for r in all_ranks]
        elif backend == "torch":
            _init_torch_distributed()
            handles = [None if group_size == world else torch.distributed.new_group(r) for r in all_ranks]
        elif backend == "shm":
            mine = shm.open_group_segment(rank(), group_size, allgather_object)
            handles = [mine if start == rank() // group_size * group_size else None
                       for start in range(0, world, group_size)]
        else:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD.Split(color=rank() // group_size, key=rank())
            handles = [comm if r[0] == rank() // group_size * group_size else None for r in all_ranks]
        _HANDLES[key] = handles
    return _HANDLES[key]


_TORCH_OPS = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
              "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}


def _init_torch_distributed() -> None:
    """A torch.distributed world with Horovod's ranks: Gloo for CPU tensors, NCCL for CUDA ones."""
    if torch.distributed.is_initialized():
        return
    _check_init()
    # Rank 0 picks the rendezvous address and a free port; Horovod tells everyone else.
    addr = None
    if rank() == 0:
        host = os.environ.get("HVDET_MASTER_ADDR") or (
            "127.0.0.1" if local_size() == size() else socket.gethostbyname(socket.gethostname()))
        if host.startswith("127.") and local_size() != size():
            # Debian maps the hostname to 127.0.1.1: other nodes would dial themselves and hang.
            addr = RuntimeError(f"rank 0's hostname resolves to {host}, which other nodes cannot reach; "
                                "set HVDET_MASTER_ADDR to rank 0's address on the cluster network")
        if addr is None:
            with socket.socket() as sock:
                sock.bind(("", 0))
                addr = f"tcp://{host}:{sock.getsockname()[1]}"
    addr = broadcast_object(addr, root_rank=0)  # the error too, so every rank raises instead of hanging
    if isinstance(addr, Exception):
        raise addr
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, init_method=addr, rank=rank(), world_size=size(),
                                         timeout=datetime.timedelta(seconds=300))


_MPI_AVAILABLE: bool | None = None


def mpi_available() -> bool:
    """mpi4py usable alongside Horovod: launched by mpirun, and Horovod runs on MPI."""
    global _MPI_AVAILABLE
    if _MPI_AVAILABLE is None:
        _MPI_AVAILABLE = False
        if "OMPI_COMM_WORLD_SIZE" in os.environ and _hvd_up() and hvd.mpi_enabled():
            try:
                from mpi4py import MPI
                _MPI_AVAILABLE = MPI.COMM_WORLD.Get_size() == size()
            except ImportError:
                pass
    return _MPI_AVAILABLE


def _mpi_allgather(tensor: torch.Tensor, comm, group_size: int) -> torch.Tensor:
    if tensor.device.type != "cpu":
        raise RuntimeError("the mpi group backend takes CPU tensors; use backend='torch' (NCCL) on GPU")
    src = tensor.detach().contiguous()
    out = torch.empty(group_size, *tensor.shape, dtype=tensor.dtype)
    comm.Allgather(src.numpy(), out.numpy())
    return out


def _mpi_allreduce(tensor: torch.Tensor, op: str, comm, group_size: int) -> torch.Tensor:
    from mpi4py import MPI
    if tensor.device.type != "cpu":
        raise RuntimeError("the mpi group backend takes CPU tensors; use backend='torch' (NCCL) on GPU")
    out = tensor.detach().clone().contiguous()
    mpi_op = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
    comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=mpi_op)
    if op == "mean":
        out /= group_size
    return out

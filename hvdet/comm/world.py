"""The world of ranks, over Horovod: the only module in hvdet that imports Horovod.

The same calls work in three settings (``comm.gradients: horovod``, the default):

* one plain process (``python train.py``): Horovod is initialized as a world of size 1 (where
  Horovod is not installed, a world of one without it, training included: the optimizer is not
  wrapped; a launched job without Horovod raises HorovodUnavailableError);
* ``horovodrun -np N`` (Gloo or MPI controller) and ``mpirun -np N``;
* a laptop CPU, where Gloo/MPI carry the tensors, or a DGX node, where NCCL does.

World collectives (gradient averaging, metric reduction, broadcasts, gathers) use Horovod; groups of
consecutive ranks are :mod:`hvdet.comm.groups`.

``comm.gradients: ddp`` (``torchrun --nproc_per_node N train.py ...``): :func:`init` chooses
torch.distributed once, and every call below marked ``@_or_torch`` then runs its counterpart in
:mod:`hvdet.comm.torch_world` (gradients averaged by DistributedDataParallel), Horovod untouched.

Longer than 300 lines because the world's API is this one list of calls, each with its Horovod body
and, marked on it, its torch.distributed counterpart; split, the two paths could drift apart.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle

import torch

from hvdet.comm import torch_world
from hvdet.comm.horovod_env import apply_defaults, init_mpi_first
from hvdet.dataclass_yaml import ConfigError

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
_DDP = False     # comm.gradients=ddp: the world is torch.distributed's (hvdet.comm.torch_world)
GRADIENTS = ("horovod", "ddp")


def _or_torch(torch_fn):
    """The decorated Horovod call, or ``torch_fn`` (its hvdet.comm.torch_world counterpart) once
    :func:`init` chose ``gradients="ddp"``; the Horovod bodies below are unchanged by that path."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return (torch_fn if _DDP else fn)(*args, **kwargs)
        return call
    return wrap


def gradients() -> str:
    """How this world averages gradients: 'horovod' or 'ddp' (``comm.gradients``, chosen at init)."""
    return "ddp" if _DDP else "horovod"


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


DEFAULT_TIMEOUT_S = 600.0
_TIMEOUT_S = DEFAULT_TIMEOUT_S


def timeout_s() -> float:
    """How long any collective may wait for a peer before this rank gives up (``comm.timeout_s``)."""
    return _TIMEOUT_S


def init(timeout_s: float | None = None, gradients: str = "horovod") -> None:
    """Initialize Horovod (idempotent). Dynamic process sets are enabled so groups can be made later.

    ``timeout_s`` (a recipe's ``comm.timeout_s``; default 600 s) is the one stall policy: Horovod's
    Gloo time-out and its stall shutdown (which also covers the MPI controller, which has no time-out
    of its own), the shared-memory and torch.distributed group collectives, and the training watchdog
    all give up after it. It must exceed the longest legitimate wait: rank 0 scoring COCO alone
    while the others wait for its metrics.

    Without Horovod, a process that no launcher started becomes a world of one; a launched one raises.

    ``gradients`` (``comm.gradients``) chooses the world once per process: ``"horovod"``, or ``"ddp"``
    (torch.distributed, :mod:`hvdet.comm.torch_world`: torchrun's ranks, or a world of one in a plain
    process). A launcher that does not match is a ConfigError naming the fix, raised before any
    rendezvous: torchrun with ``horovod`` would otherwise start N unrelated worlds of one, each
    writing the same output_dir.
    """
    global _SINGLE, _TIMEOUT_S, _DDP
    if gradients not in GRADIENTS:
        raise ValueError(f"gradients must be one of {', '.join(GRADIENTS)}, got {gradients!r}")
    if timeout_s is not None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        _TIMEOUT_S = float(timeout_s)
    _check_launcher(gradients)
    if gradients == "ddp":
        if _SINGLE or _hvd_up():
            raise RuntimeError("comm.init(gradients='ddp'): this process already initialized the Horovod world")
        _DDP = True
        torch_world.init(_TIMEOUT_S)
        return
    if _DDP:
        raise RuntimeError("comm.init(gradients='horovod'): this process already initialized the torch.distributed "
                           "world (comm.gradients=ddp)")
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
    apply_defaults(os.environ, torch.cuda.is_available())  # Open MPI's yield, Horovod's cycle
    # Set, not defaulted: horovodrun always exports its own --gloo-timeout-seconds (30 s), which would
    # kill a job whose rank 0 scores COCO for longer; one policy, from the recipe.
    os.environ["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(max(1, round(_TIMEOUT_S)))
    os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(max(1, min(60, round(_TIMEOUT_S / 2))))
    os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(max(1, round(_TIMEOUT_S)))
    # Elastic worlds are re-initialized by Horovod's elastic runner without dynamic process sets, so
    # they never have them (hvdet.comm.elastic); BN groups use shared memory or torch.distributed.
    init_mpi_first()  # so that another rank's exit does not finalize this rank's MPI
    hvd.init(**({} if elastic_launch() else {"process_sets": "dynamic"}))
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())


def _check_launcher(gradients: str) -> None:
    """A launcher that does not match ``gradients``: one line saying what to change."""
    if gradients == "ddp" and _launched() and not torch_world.launched():  # (srun may run torchrun: trust torchrun)
        raise ConfigError("comm.gradients=ddp needs torchrun (torchrun --nproc_per_node N train.py ...), but "
                          "horovodrun/mpirun started this process: drop comm.gradients=ddp to average with "
                          "Horovod, or launch with torchrun")
    if gradients == "horovod" and torch_world.launched() and not _launched():
        raise ConfigError("torchrun started this process, but comm.gradients=horovod: add comm.gradients=ddp "
                          "to average gradients with DistributedDataParallel, or launch with horovodrun/mpirun")


@_or_torch(torch_world.peer_lost)
def peer_lost(message: str) -> Exception:
    """The error for "a peer is gone": Horovod's own HorovodInternalError, so that Horovod elastic
    recovers from it as from a failed Horovod op (a RuntimeError without Horovod)."""
    return hvd.HorovodInternalError(message) if hvd is not None else RuntimeError(message)


@_or_torch(torch_world.is_peer_loss)
def is_peer_loss(err: BaseException) -> bool:
    """``err`` says a peer died or the hosts changed (Horovod's errors for it, or torch.distributed's
    from a BN group that took that backend), not what this rank did."""
    return type(err).__name__ in ("HorovodInternalError", "HostsUpdatedInterrupt") or torch_world.is_peer_loss(err)


def is_horovod_error(err: BaseException) -> bool:
    """``err`` is Horovod's HorovodInternalError: a Horovod op failed because a peer died or left (or
    :func:`peer_lost` made it so). Only this module sees Horovod's classes, so the CLI asks here."""
    return hvd is not None and isinstance(err, hvd.HorovodInternalError)


def elastic_launch() -> bool:
    """True in a process that horovodrun started in elastic mode (--min-np / --max-np)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_api():
    """Horovod's elastic State base class and runner, for hvdet.comm.elastic."""
    from horovod.common.elastic import State, run_fn
    return State, run_fn


@_or_torch(torch_world.is_initialized)
def is_initialized() -> bool:
    return _SINGLE if hvd is None else hvd.is_initialized()


def _hvd_up() -> bool:
    return hvd is not None and hvd.is_initialized()


def check_init() -> None:
    if not is_initialized():
        raise RuntimeError("hvdet.comm.init() must be called first")


@_or_torch(torch_world.rank)
def rank() -> int:
    return hvd.rank() if _hvd_up() else 0


@_or_torch(torch_world.size)
def size() -> int:
    return hvd.size() if _hvd_up() else 1


@_or_torch(torch_world.local_rank)
def local_rank() -> int:
    return hvd.local_rank() if _hvd_up() else 0


@_or_torch(torch_world.local_size)
def local_size() -> int:
    return hvd.local_size() if _hvd_up() else 1


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its local GPU when CUDA is present, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@_or_torch(torch_world.controller)
def controller() -> str:
    """'mpi' or 'gloo': how Horovod's ranks talk to each other (under ddp: torch.distributed's backend)."""
    check_init()
    return "mpi" if _need_horovod("controller()").mpi_enabled() else "gloo"


@_or_torch(torch_world.build_info)
def build_info() -> dict:
    hvd = _need_horovod("build_info()")
    return {"gloo": hvd.gloo_built(), "mpi": hvd.mpi_built(), "nccl": hvd.nccl_built(),
            "cuda": hvd.cuda_built()}


# ---------------------------------------------------------------------------------------------
# World collectives (Horovod; under comm.gradients=ddp, hvdet.comm.torch_world's)
# ---------------------------------------------------------------------------------------------

@_or_torch(torch_world.allreduce)
def allreduce(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    """Allreduce over all ranks; returns a new tensor. op: sum | mean | max | min."""
    if size() == 1:
        return tensor.clone()
    return hvd.allreduce(tensor, name=name, op=OPS[op])


def grouped_allreduce(tensors: list[torch.Tensor], op: str = "sum", compression: str = "none",
                      name: str = "hvdet.grouped_allreduce") -> list[torch.Tensor]:
    """One fused Horovod allreduce of several tensors, as Horovod's optimizer does a backward pass's
    gradients (``compression="fp16"``: ``solver.fp16_allreduce``). Unlike the other wrappers it runs
    in a world of one too, so one GPU can show which of Horovod's backends reduces its tensors
    (launch/allreduce_check.py --backends, under :func:`timeline`)."""
    horovod = _need_horovod("grouped_allreduce")
    return horovod.grouped_allreduce(tensors, name=name, op=OPS[op], compression=_compression(compression))


def _compression(name: str):
    """Horovod's compressor for ``name`` (none | fp16); a ValueError naming the choices otherwise."""
    if name not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {name!r}")
    return _COMPRESSION[name]


@contextlib.contextmanager
def timeline(path: str):
    """Horovod's timeline (chrome://tracing JSON) of the collectives inside the block: each is named
    by the backend that ran it (``NCCL_ALLREDUCE``, ``GLOO_ALLREDUCE``, ``MPI_ALLREDUCE``), with its
    fusion-buffer copies (``MEMCPY_IN_FUSION_BUFFER``: Horovod's own CUDA kernels on a GPU). Horovod
    allows it only when ``HOROVOD_TIMELINE=DYNAMIC`` was in the environment at :func:`init`."""
    horovod = _need_horovod("timeline")
    horovod.start_timeline(path, mark_cycles=False)
    try:
        yield path
    finally:
        horovod.stop_timeline()


@_or_torch(torch_world.allgather_object)
def allgather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    if size() == 1:
        return [obj]
    # An explicit name, as in broadcast_object: ranks passing objects of different types (None and a
    # str, say) would otherwise submit differently named collectives that never match.
    return hvd.allgather_object(obj, name="hvdet.allgather_object")


@_or_torch(torch_world.gather_object)
def gather_object(obj, root_rank: int = 0) -> list | None:
    """Every rank's ``obj``, in rank order, on ``root_rank`` only (None elsewhere); pickled.

    Horovod has no gather; an alltoall in which every rank sends its bytes to the root alone is one
    (each rank's data crosses the network once, instead of to every rank as in an allgather).
    """
    if size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    splits = torch.zeros(size(), dtype=torch.int32)
    splits[root_rank] = data.numel()
    received, counts = hvd.alltoall(data, splits=splits, name="hvdet.gather_object")
    if rank() != root_rank:
        return None
    return [pickle.loads(part.numpy().tobytes()) for part in torch.split(received, counts.tolist())]


@_or_torch(torch_world.broadcast_object)
def broadcast_object(obj, root_rank: int = 0):
    """Root's ``obj`` on every rank (pickled); the others may pass anything, e.g. None."""
    if size() == 1:
        return obj
    # An explicit name: Horovod's default is type(obj).__name__, which differs between the root's
    # object and the others' placeholders, and collectives with different names never match (hang).
    return hvd.broadcast_object(obj, root_rank=root_rank, name="hvdet.broadcast_object")


@_or_torch(torch_world.broadcast_parameters)
def broadcast_parameters(state, root_rank: int = 0) -> None:
    """Overwrite every rank's parameters/buffers (a state_dict or named_parameters) with root's."""
    if size() > 1:
        hvd.broadcast_parameters(state, root_rank=root_rank)


@_or_torch(torch_world.broadcast_optimizer_state)
def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Root's optimizer state (moments, step counters, hyper-parameters) on every rank."""
    if size() > 1:
        hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)


@_or_torch(torch_world.barrier)
def barrier() -> None:
    if size() > 1:
        hvd.barrier()


@_or_torch(torch_world.distributed_optimizer)
def distributed_optimizer(optimizer: torch.optim.Optimizer, named_parameters, *, compression: str = "none",
                          backward_passes_per_step: int = 1, op: str = "mean", model: torch.nn.Module | None = None):
    """Wrap ``optimizer`` so ``step()`` applies gradients ring-allreduced over all ranks.

    Gradients are allreduced asynchronously as backward produces them; ``synchronize()`` waits for
    them (call it before clipping, then step inside ``skip_synchronize()``). ``model`` (the module
    that owns ``named_parameters``) is for the ddp path, which wraps it; Horovod does not need it.
    """
    compressor = _compression(compression)
    if hvd is None and _SINGLE and size() == 1:
        # One plain process without Horovod (a GPU box that was not set up for it): there is nothing
        # to average, so the optimizer itself trains; hvdet.step works with either.
        print(f"hvdet: Horovod is unavailable ({_HOROVOD_ERROR}); training as one process without it",
              flush=True)
        return optimizer
    horovod = _need_horovod("distributed_optimizer (hvdet's training loop)")
    return horovod.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                    compression=compressor,
                                    backward_passes_per_step=backward_passes_per_step, op=OPS[op])


@_or_torch(torch_world.shutdown)
def shutdown() -> None:
    if _hvd_up():
        hvd.shutdown()

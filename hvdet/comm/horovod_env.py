"""The Horovod and Open MPI settings hvdet chooses for a rank, where the user has not, and MPI
initialized before Horovod under mpirun (:func:`init_mpi_first`).

:func:`hvdet.comm.world.init` applies them before ``hvd.init()`` (which reads them, and Open MPI's at
``MPI_Init`` inside it). The figures behind each are in docs/training.md, "Gradient communication on
CPU hosts" (benchmarks/ddp_baseline.py).
"""
from __future__ import annotations

import contextlib
import os

_APPLIED_DEFAULTS: dict[str, str] = {}


def applied_defaults() -> dict[str, str]:
    """The settings :func:`apply_defaults` put into this process's environment. A process that
    initialized hvdet and then launches new ranks (a test, a benchmark driver) should leave them out
    of the ranks' environment: they are this process's choice (its controller, its device), and the
    ranks make their own; inherited, they would look like the user's and win."""
    return dict(_APPLIED_DEFAULTS)


def _gloo_controller(env) -> bool:
    """Horovod will coordinate over Gloo: horovodrun --gloo (its rendezvous) or HOROVOD_CONTROLLER=gloo."""
    return "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env or env.get("HOROVOD_CONTROLLER") == "gloo"


def horovod_defaults(env, cuda: bool) -> dict[str, str]:
    """Horovod and Open MPI settings that :func:`init` sets where the user has not.

    On a host without CUDA each rank's math thread, Horovod's background thread and MPI's progress
    share the cores (benchmarks/ddp_baseline.py measured each;
    docs/training.md "Gradient communication on CPU hosts" has the figures):

    * ``OMPI_MCA_mpi_yield_when_idle=1``: Open MPI spins in every blocking call; with one core per
      rank, Horovod's background thread spinning in MPI_Allreduce took the core from backward (2-rank
      throughput 0.71x of a DDP loop under mpirun; with the yield, on par). Read at MPI_Init, which
      ``hvd.init()`` runs, so setting it here reaches mpirun's ranks too.
    * ``HOROVOD_CYCLE_TIME``: the background thread negotiates every cycle even with nothing queued,
      and a gradient waits up to one cycle. Over Gloo an idle cycle costs enough that 20 ms was
      fastest (1 ms: 0.74x of 20 ms, 5 ms: 0.86x); over MPI with the yield, 5 ms (20 ms: 0.94x).

    GPU hosts have cores to spare and NCCL carries the gradients: only the 5-ms cycle that the launch
    scripts have always set for large models (fewer, larger fused allreduces than Horovod's 1 ms).

    Elastic jobs (horovodrun --min-np/--max-np) also get ``HOROVOD_CACHE_CAPACITY=0``: Horovod keeps
    its response cache through ``hvd.shutdown()`` and ``hvd.init()`` (``ResponseCache::set_capacity``
    clears it only when the capacity changes), so after a world change the surviving ranks hold the old
    world's cache and a rank that joins holds none; they disagree on the cache bits and Gloo aborts on a
    message of the wrong size (``op.preamble.length <= op.nbytes``, seen on launch/testcluster.py when a
    host was added). Without the cache every tensor is negotiated every cycle (docs/cluster.md).
    """
    elastic = {"HOROVOD_CACHE_CAPACITY": "0"} if env.get("HOROVOD_ELASTIC") == "1" else {}
    if cuda:
        return {"HOROVOD_CYCLE_TIME": "5", **elastic}
    return {"HOROVOD_CYCLE_TIME": "20" if _gloo_controller(env) else "5", "OMPI_MCA_mpi_yield_when_idle": "1",
            **elastic}


def apply_defaults(environ, cuda: bool) -> None:
    """Put :func:`horovod_defaults` into ``environ`` (``os.environ``) where unset, remembering what was set."""
    for key, value in horovod_defaults(environ, cuda).items():
        if key not in environ:  # the user's own setting wins
            environ[key] = _APPLIED_DEFAULTS[key] = value


def init_mpi_first() -> None:
    """Under mpirun, initialize MPI through mpi4py (``MPI_Init_thread(MPI_THREAD_MULTIPLE)``, finalized
    at interpreter exit) before ``hvd.init()``. Horovod finalizes MPI when its background thread ends
    if it initialized MPI itself, and any rank's ``hvd.shutdown()`` (its exit) ends every rank's
    Horovod: so ranks still in collectives of the ``mpi`` group backend (hvdet.comm.mpi_group) lost
    MPI under them (measured: "MPI_Comm_test_inter() called after MPI_FINALIZE", or a hang with the
    pair in two different collectives). With MPI initialized first, Horovod leaves it up. No-op
    without mpirun or mpi4py."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return
    with contextlib.suppress(ImportError):
        from mpi4py import MPI  # noqa: F401 - importing initializes MPI (mpi4py.rc: thread level "multiple")

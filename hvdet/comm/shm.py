"""Group backend ``shm``: a shared-memory allreduce for the ranks of one host (Cross-GPU BN on CPUs).

A ResNet-50 CGBN step makes 159 small allreduces in sequence, so their latency is its cost. On a
CPU host, torch's Gloo allreduce of 257 doubles over loopback TCP took 0.6-1.7 ms here (a ping-pong
of the same bytes: 0.1 ms), and Horovod's waits for its background cycle; mpi4py over shared memory
took 7 us but exists only under ``mpirun``. This path needs no launcher support: the ranks of a group
map one file in /dev/shm and meet there.

Layout: one 64-byte line per rank holding its sequence number, then two buffers ("parities") of one
slot per rank. Allreduce number k (counted per group, the same on every rank):

    1. write my tensor into slot[k % 2][me]       # my slot of this op's parity
    2. seq[me] = k                                # publish (x86-64 keeps stores in order: TSO)
    3. wait until seq[j] >= k for every j         # spin briefly, then yield the core
    4. result = sum_j slot[k % 2][j]              # in rank order: the same bits on every rank

Why two parities: a rank that finished op k may start op k+1 while a slower one still reads op k's
slots; op k+1 writes the other parity, and op k+2 (which reuses op k's) cannot start before every
rank has published k+1, that is, finished reading op k.

A rank that never arrives (a dead or stalled peer) makes the others raise after ``timeout_s``
(``comm.timeout_s``) with the missing ranks named, instead of hanging; while waiting they back off
from spinning to yielding to sleeping, so a stalled peer does not cost the host its cores.

No segment outlives its job by name: the creator unlinks it once every member has mapped it, or when
setting up fails; a segment whose creator was killed before either (its name carries the creator's
pid) is removed by the next job on the host that opens a segment. Only x86-64 is supported: step 2 relies on its store
order (ARM would need a fence that Python cannot express).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import platform
import re
import socket
import tempfile
import time
import uuid
import warnings

import numpy as np
import torch

from hvdet.comm import world

LINE = 64                                    # bytes per sequence number: no false sharing
CAPACITY = 8192                              # float64 per slot: 2 x 2048 channels + count fits
SPIN = 200                                   # polls before the waiting rank starts yielding its core
YIELD_S = 0.002                              # then yields the core for this long, then sleeps
MAX_SLEEP_S = 0.001                          # at most this long between polls
CHECK_S = 0.2                                # how often a waiting rank checks that its peers still run
OPS = {"sum": np.sum, "mean": np.sum, "max": np.max, "min": np.min}


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


_NAME = re.compile(r"^hvdet-(\d+)-[0-9a-f]{32}$")


def new_path() -> str:
    return os.path.join(segment_dir(), f"hvdet-{os.getpid()}-{uuid.uuid4().hex}")


def sweep_stale(folder: str | None = None) -> list[str]:
    """Unlink segments whose creating process is gone (killed between creating and unlinking)."""
    folder = folder or segment_dir()
    removed = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another job swept it first
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return -1


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (0: not yet known, counted as running)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def host_identity() -> tuple[str, str]:
    """What makes two ranks "on one host" here: the hostname and the kernel's boot id.

    A file that opens is not enough: ``segment_dir`` may be seen by several nodes (the /tmp fallback
    on a shared file system, containers sharing a mount), where a peer on another node could open
    the file but never see this node's stores. Ranks of one node share both; nodes differ in the
    hostname at least (launch/testcluster.py's hosts share the boot id, not the hostname).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


def open_group_segment(rank: int, group_size: int, allgather) -> ShmAllreduce | None:
    """This rank's group segment, or None on every rank unless every group got one.

    Collective over the whole world (``allgather``: every rank's object, in rank order, on every
    rank). Each group's first rank creates the file, the others on its host (:func:`host_identity`)
    attach, and once all have mapped it the creator unlinks it: the memory stays until the
    processes exit, the name does not.
    """
    first = rank // group_size * group_size
    mine, error = None, None
    if rank == first and supported():
        try:
            sweep_stale()
            mine = ShmAllreduce(new_path(), 0, group_size, create=True)
        except OSError as err:
            error = err
    try:
        found = allgather((host_identity(), mine.path if mine else None))
        paths = [path for _, path in found]
        same_host = found[rank][0] == found[first][0]
        if rank != first and paths[first] is not None and same_host:
            try:
                mine = ShmAllreduce(paths[first], rank - first, group_size)
            except OSError as err:  # the creator is on another host (or in another container)
                error = err
        attached = allgather(mine is not None)
    finally:
        # Every member has mapped it, or one failed before (a dead rank): the name goes either way.
        if rank == first and mine is not None:
            mine.unlink()
    if all(attached):
        return mine
    if error is not None:
        warnings.warn(f"hvdet: no shared-memory group collective ({error}); using the next backend",
                      stacklevel=2)
    return None


class ShmBackend:
    """The group backend over :class:`ShmAllreduce` (CPU tensors of up to :data:`CAPACITY` elements)."""

    name = "shm"
    max_numel = CAPACITY

    def __init__(self, segment: ShmAllreduce):
        self.segment = segment

    @classmethod
    def open(cls, group_size: int) -> ShmBackend | None:
        """Collective over the world; None on every rank unless every group's ranks share a host."""
        segment = open_group_segment(world.rank(), group_size, world.allgather_object)
        return cls(segment) if segment is not None else None

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return self.segment.allreduce(tensor, op)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.segment.allgather(tensor)


class ShmAllreduce:
    """One group's shared segment, seen from group rank ``index`` of ``size``.

    The group's first rank calls it with ``create=True`` before the others attach; every member
    then waits for all to attach (a collective outside this class) before the creator calls
    :meth:`unlink`, so the file never outlives the job, even one that crashes.
    """

    def __init__(self, path: str, index: int, size: int, create: bool = False, timeout_s: float | None = None):
        self.path, self.index, self.size = path, index, size
        self.timeout_s = world.timeout_s() if timeout_s is None else timeout_s
        header = size * LINE
        nbytes = header + 2 * size * CAPACITY * 8
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)  # FileNotFoundError when the creator is on another host
        try:
            if create:
                os.ftruncate(fd, nbytes)
            elif os.fstat(fd).st_size != nbytes:
                raise OSError(f"{path}: {os.fstat(fd).st_size} bytes, expected {nbytes} (another job's file?)")
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._seq = np.ndarray((size,), np.int64, self._map, 0, (LINE,))
        # Beside each rank's sequence number: its pid, and its pid namespace (a pid is only meaningful
        # to ranks in the same one; containers sharing /dev/shm may each have their own).
        self._pids = np.ndarray((size,), np.int64, self._map, 8, (LINE,))
        self._pid_ns = np.ndarray((size,), np.int64, self._map, 16, (LINE,))
        self._pid_ns[index], self._pids[index] = _pid_namespace(), os.getpid()
        self._slots = np.ndarray((2, size, CAPACITY), np.float64, self._map, header)
        self._count = 0

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The group's reduction of ``tensor`` (CPU, at most CAPACITY elements); a new tensor."""
        slots = self._exchange(tensor)
        out = OPS[op](slots, axis=0)                                                # 4. rank order
        if op == "mean":
            out /= self.size
        return torch.from_numpy(out).to(tensor.dtype).reshape(tensor.shape)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every group rank's ``tensor`` stacked in group order: [size, *tensor.shape]; a new tensor."""
        slots = self._exchange(tensor)
        return torch.from_numpy(slots.copy()).to(tensor.dtype).reshape(self.size, *tensor.shape)

    def _exchange(self, tensor: torch.Tensor) -> np.ndarray:
        """Steps 1-3: publish ``tensor`` and wait for every rank's; returns this op's [size, n] slots
        (valid until this rank's op after next)."""
        n = tensor.numel()
        if n > CAPACITY or tensor.device.type != "cpu":
            raise ValueError(f"shm collectives take CPU tensors of at most {CAPACITY} elements, got {n} on "
                             f"{tensor.device}")
        self._count += 1
        parity = self._count & 1
        self._slots[parity, self.index, :n] = tensor.detach().reshape(-1).double().numpy()  # 1.
        self._seq[self.index] = self._count                                         # 2. publish
        self._wait(self._count)                                                     # 3.
        return self._slots[parity, :, :n]

    def _wait(self, count: int) -> None:
        seq = self._seq
        for _ in range(SPIN):  # a peer a few microseconds behind: do not give the core away
            if seq.min() >= count:
                return
        start = time.monotonic()
        deadline, pause, next_check = start + self.timeout_s, 5e-5, start + CHECK_S
        while seq.min() < count:
            now = time.monotonic()
            if now - start < YIELD_S:
                # A peer still computing: let other threads (Horovod's, the peer on a shared core) run.
                os.sched_yield()
            else:
                # Longer: sleep, doubling up to 1 ms, so a stalled peer does not cost a core.
                time.sleep(pause)
                pause = min(2 * pause, MAX_SLEEP_S)
            if now >= next_check:  # a peer whose process is gone never arrives: say so now
                next_check = now + CHECK_S
                dead = [j for j in range(self.size) if seq[j] < count and self._pid_ns[j] == _pid_namespace()
                        and not _running(int(self._pids[j]))]
                if dead:
                    raise world.peer_lost(f"shm allreduce #{count}: the process of group ranks {dead} is gone "
                                          "(killed or crashed)")
            if now > deadline:
                missing = [j for j in range(self.size) if seq[j] < count]
                raise TimeoutError(f"shm allreduce #{count}: group ranks {missing} did not arrive within "
                                   f"{self.timeout_s:.0f} s (dead or stuck, or running other layers)")

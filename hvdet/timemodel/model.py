"""The cost model: one training step on N GPUs = compute + Cross-GPU BN's collectives + the part of the
gradient allreduce that backward does not hide.

    step_s(N)       = compute_s + cgbn_s(N) + exposed_allreduce_s(N)
    efficiency(N)   = step_s(1) / step_s(N) = compute_s / step_s(N)      (same images per GPU: weak scaling)
    time_to_train_s = images / (N * images_per_gpu) * step_s(N)          (the same epochs at every N)

``compute_s`` is one GPU's step without communication (forward, backward, optimizer, data), measured;
nothing here predicts compute. Every formula is a pure function of its arguments; the numbers they
take (links, models, Horovod settings) are in :mod:`hvdet.timemodel.presets`, with their sources.

**Allreduce of b bytes over N GPUs in M nodes** (``allreduce_s``), per-direction bandwidths:

* ``ring`` (NCCL's ring, Horovod's default NCCL allreduce; Patarasuk & Yuan 2009)::

      2(N-1)/N * b / bw + base + 2(N-M) * a_intra + 2(M-1) * a_inter

  ``bw`` is a GPU's NVLink bandwidth inside one node; across nodes the ring also crosses the NICs, so
  ``bw = min(bw_intra, node's total NIC bandwidth)`` (one ring per NIC, NCCL's channels). Of the
  2(N-1) steps, 2(M-1) cross a node boundary (NCCL's own latency model, src/graph/tuning.cc).
* ``hierarchical`` (``HOROVOD_HIERARCHICAL_ALLREDUCE=1``: NCCL reduce-scatter in the node, an
  allreduce of each GPU's 1/g share across the M nodes, NCCL allgather in the node; g GPUs per node)::

      2 * [(g-1)/g * b / bw_intra + (g-1) * a_intra]  +  2(M-1)/M * b / bw_net + 2(M-1) * a_inter  +  3 base

  (the g concurrent inter-node rings of b/g bytes share the node's NICs: (b/g) / (bw_net/g)).
* ``tree`` (NCCL >= 2.4's double binary tree; its latency term from NCCL's tuning.cc)::

      2 * b / bw + base + 2 * ((g-1) * a_intra + ceil(log2 M) * a_inter)

* ``best``: the smallest of the three, what NCCL's tuner (ring vs tree) or a user setting
  ``HOROVOD_HIERARCHICAL_ALLREDUCE`` would pick. Horovod itself defaults to NCCL's allreduce.

**Tensor fusion and overlap with backward** (``horovod_schedule``): Horovod's background thread wakes
every ``HOROVOD_CYCLE_TIME``, takes the gradients ready by then and allreduces them in fused buffers
of at most ``HOROVOD_FUSION_THRESHOLD`` bytes, one after another; if they overrun the cycle, the next
cycle starts when they end. Gradients are assumed to become ready at a constant rate over backward
(b_ready(t) = B * t / backward_s). The loop is simulated as written, so the number of fused allreduces
and the hidden part both follow from the inputs: no overlap factor is fitted. What is exposed is the
time from the end of backward to the end of the last allreduce, averaged over 8 phases of the cycle
against the step (the cycle keeps its own clock). Not modelled: backward slowing down
while NCCL kernels share the GPU, Horovod's negotiation cost growing with N, stragglers.

**Cross-GPU BN** (``cgbn_s``, MegDet Algorithm 1): per step, ``layers x collectives`` small
allreduces over a group of g GPUs (3 per layer for MegDet's two-pass statistics: sum, then variance
sum, then one in backward; 2 for hvdet's Chan merge or one-pass). Each carries 2C+1 numbers, so
latency decides: a ring's ``bn_base + 2(g-M_g) * bn_hop + 2(M_g-1) * a_inter`` (M_g nodes in the
group; NCCL's low-latency LL protocol figures for bn_base / bn_hop). They sit on the critical path
(each layer waits for its statistics), so none of it is hidden.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

ALGORITHMS = ("ring", "hierarchical", "tree")


@dataclass(frozen=True)
class Link:
    """A link class: per-direction bandwidth (bytes/s) and per-hop latency (s) of one ring step."""

    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class System:
    """A cluster: identical nodes of ``gpus_per_node`` GPUs. ``intra`` is one GPU's link inside a node
    (NVLink, PCIe, shared memory); ``inter`` is one node's network: **all its NICs together**."""

    name: str
    gpus_per_node: int
    intra: Link
    inter: Link
    base_latency_s: float  # fixed cost of one collective (launch, NCCL's baseLat)
    bn_base_latency_s: float  # the same for CGBN's small collectives (NCCL's LL protocol)
    bn_hop_latency_s: float  # per intra-node hop of a small collective
    source: str = ""

    def nodes(self, gpus: int) -> int:
        return math.ceil(gpus / self.gpus_per_node)


@dataclass(frozen=True)
class Horovod:
    """Horovod's tensor fusion settings and the allreduce algorithm."""

    fusion_bytes: float = 128 * 2**20  # HOROVOD_FUSION_THRESHOLD: 128 MiB since 0.21 (64 MiB before)
    cycle_s: float = 1e-3  # HOROVOD_CYCLE_TIME: 1 ms since 0.21 (5 ms before)
    algorithm: str = "best"  # ring | hierarchical | tree | best

    def __post_init__(self):
        if self.fusion_bytes <= 0 or self.cycle_s <= 0:
            raise ValueError(f"fusion_bytes and cycle_s must be > 0, got {self.fusion_bytes}, {self.cycle_s}")
        if self.algorithm not in (*ALGORITHMS, "best"):
            raise ValueError(f"algorithm must be one of {(*ALGORITHMS, 'best')}, got {self.algorithm!r}")


@dataclass(frozen=True)
class Workload:
    """One GPU's share of a step. ``compute_s`` and ``backward_s`` are seconds per step at
    ``images_per_gpu`` without any communication; ``backward_s`` is the part during which gradients
    become ready."""

    params: float
    compute_s: float
    backward_s: float
    images_per_gpu: int = 2
    bytes_per_grad: int = 4  # fp32 gradients; 2 when they are allreduced in fp16 / bf16
    bn_layers: int = 0  # Cross-GPU BN layers (0: frozen or per-GPU BN)
    bn_collectives: int = 3  # per layer and step: 3 two-pass (MegDet), 2 chan / one-pass
    bn_group: int = 1  # GPUs per CGBN group = BN size / images per GPU

    @property
    def grad_bytes(self) -> float:
        return self.params * self.bytes_per_grad


@dataclass(frozen=True)
class Step:
    """The modelled step on ``gpus`` GPUs, its parts in seconds."""

    gpus: int
    compute_s: float
    cgbn_s: float
    allreduce_ops: float  # fused allreduces per step (a mean over the cycle's phase)
    allreduce_s: float  # their total duration
    exposed_s: float  # the part not hidden behind backward

    @property
    def step_s(self) -> float:
        return self.compute_s + self.cgbn_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s


def ring_allreduce_s(nbytes: float, gpus: int, system: System) -> float:
    if gpus <= 1:
        return 0.0
    m = system.nodes(gpus)
    bw = system.intra.bandwidth_Bps if m == 1 else min(system.intra.bandwidth_Bps, system.inter.bandwidth_Bps)
    inter_hops = 2 * (m - 1)
    intra_hops = 2 * (gpus - 1) - inter_hops
    return (2 * (gpus - 1) / gpus * nbytes / bw + system.base_latency_s
            + intra_hops * system.intra.latency_s + inter_hops * system.inter.latency_s)


def hierarchical_allreduce_s(nbytes: float, gpus: int, system: System) -> float:
    m = system.nodes(gpus)
    if m == 1:
        return ring_allreduce_s(nbytes, gpus, system)
    g = system.gpus_per_node
    in_node = (g - 1) / g * nbytes / system.intra.bandwidth_Bps + (g - 1) * system.intra.latency_s
    across = 2 * (m - 1) / m * nbytes / system.inter.bandwidth_Bps + 2 * (m - 1) * system.inter.latency_s
    return 2 * in_node + across + 3 * system.base_latency_s  # reduce-scatter + allreduce + allgather


def tree_allreduce_s(nbytes: float, gpus: int, system: System) -> float:
    if gpus <= 1:
        return 0.0
    m = system.nodes(gpus)
    g = min(gpus, system.gpus_per_node)
    bw = system.intra.bandwidth_Bps if m == 1 else min(system.intra.bandwidth_Bps, system.inter.bandwidth_Bps)
    hops = (g - 1) * system.intra.latency_s + math.ceil(math.log2(m)) * system.inter.latency_s
    return 2 * nbytes / bw + system.base_latency_s + 2 * hops


_ALLREDUCE = {"ring": ring_allreduce_s, "hierarchical": hierarchical_allreduce_s, "tree": tree_allreduce_s}


def allreduce_s(nbytes: float, gpus: int, system: System, algorithm: str = "best") -> float:
    """One allreduce of ``nbytes`` over ``gpus`` GPUs (0 on one GPU); ``best`` = the fastest algorithm."""
    if algorithm == "best":
        return min(f(nbytes, gpus, system) for f in _ALLREDUCE.values())
    return _ALLREDUCE[algorithm](nbytes, gpus, system)


def cgbn_s(w: Workload, gpus: int, system: System) -> float:
    """Cross-GPU BN's collectives in one step (0 for a group of one GPU). A group larger than the
    world is the world, as with ``bn.size_images: null``."""
    g = min(w.bn_group, gpus)
    if g <= 1 or w.bn_layers == 0:
        return 0.0
    m = system.nodes(g)
    one = (system.bn_base_latency_s + 2 * (g - m) * system.bn_hop_latency_s
           + 2 * (m - 1) * system.inter.latency_s)
    return w.bn_layers * w.bn_collectives * one


@dataclass(frozen=True)
class Schedule:
    ops: int
    comm_s: float
    exposed_s: float


def horovod_schedule(grad_bytes: float, backward_s: float, horovod: Horovod,
                     op_s: Callable[[float], float], phase_s: float = 0.0) -> Schedule:
    """Horovod's background loop over one backward pass (see the module docstring). ``op_s(bytes)`` is
    one fused allreduce's duration; the loop's first cycle starts ``phase_s`` after backward does.
    With ``backward_s == 0`` every gradient is ready at once: ceil(B / fusion) allreduces back to
    back, all exposed."""
    tol = 1e-9 * grad_bytes
    t, done, comm, finish = phase_s, 0.0, 0.0, 0.0
    ops = 0
    while grad_bytes - done > tol:
        cycle_start = t
        ready = grad_bytes if t >= backward_s else grad_bytes * t / backward_s
        pending = ready - done  # negotiated at the cycle's start; later gradients wait for the next
        while pending > tol:
            chunk = min(pending, horovod.fusion_bytes)
            d = op_s(chunk)
            t, comm, done, pending, ops = t + d, comm + d, done + chunk, pending - chunk, ops + 1
            finish = t
        t = max(t, cycle_start + horovod.cycle_s)
    return Schedule(ops, comm, max(0.0, finish - backward_s))


PHASES = 8  # Horovod's cycle has no fixed phase against the step: an average over 8 offsets


def step(w: Workload, gpus: int, system: System, horovod: Horovod = Horovod()) -> Step:
    """The modelled step of workload ``w`` on ``gpus`` GPUs of ``system``: the Horovod loop's figures
    are means over ``PHASES`` evenly spaced offsets of its cycle (one offset would make the exposed
    time jump by up to a cycle as backward_s crosses a cycle boundary)."""
    cgbn = cgbn_s(w, gpus, system)
    if gpus <= 1:
        return Step(gpus, w.compute_s, cgbn, 0.0, 0.0, 0.0)
    runs = [horovod_schedule(w.grad_bytes, w.backward_s, horovod,
                             lambda b: allreduce_s(b, gpus, system, horovod.algorithm), k * horovod.cycle_s / PHASES)
            for k in range(PHASES)]
    return Step(gpus, w.compute_s, cgbn, sum(r.ops for r in runs) / PHASES, sum(r.comm_s for r in runs) / PHASES,
                sum(r.exposed_s for r in runs) / PHASES)


def time_to_train_s(s: Step, images: float, images_per_gpu: int) -> float:
    """Seconds to process ``images`` training images (the same epochs at every scale)."""
    return images / (s.gpus * images_per_gpu) * s.step_s


def from_measured_step(w: Workload, step_s: float, gpus: int, system: System, horovod: Horovod = Horovod(),
                       backward_fraction: float = 2 / 3) -> Workload:
    """``w`` with the compute that makes the modelled step on ``gpus`` GPUs equal ``step_s`` (the
    measured step minus the modelled CGBN and exposed allreduce there), ``backward_s =
    backward_fraction * compute_s``. Found by bisection: the exposed part depends on backward_s, in
    steps (the simulated loop's), so the match is to within a fraction of a cycle. On one GPU it is
    the measured step itself."""
    def at(c: float) -> Workload:
        return replace(w, compute_s=c, backward_s=backward_fraction * c)

    lo, hi = 0.0, step_s
    floor = step(at(lo), gpus, system, horovod)
    if floor.step_s >= step_s:
        raise ValueError(f"the modelled communication on {gpus} GPUs of {system.name} "
                         f"({floor.step_s * 1e3:.1f} ms) is at least the measured step ({step_s * 1e3:.1f} ms)")
    for _ in range(50):  # step_s(c) >= c and grows with c: keep step(lo) < step_s <= step(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step(at(mid), gpus, system, horovod).step_s < step_s else (lo, mid)
    return at((lo + hi) / 2)


def scale_images(w: Workload, images_per_gpu: int) -> Workload:
    """The same model at another per-GPU batch, compute proportional to images (an assumption: small
    per-GPU batches use a GPU less well, so this flatters them)."""
    k = images_per_gpu / w.images_per_gpu
    return replace(w, images_per_gpu=images_per_gpu, compute_s=w.compute_s * k, backward_s=w.backward_s * k)

"""What Cross-GPU BN costs over local BN: forward+backward of a ResNet-50-FPN backbone at 2 ranks.

    .venv/bin/python benchmarks/bn_overhead.py [--image-size 160] [--images-per-gpu 2] [--repeats 10]

Launches its own jobs (horovodrun --gloo, then mpirun) through tests.harness, one thread per rank.
In each job one model is built, its 53 BatchNorm2d layers converted to CrossGPUBatchNorm2d, and the
variants are switched in place: ``local`` (a group of one rank: torch's own BN kernel), CGBN over
both ranks on the group backends the launch offers (shm, the CPU default; Gloo through torch;
Horovod; mpi4py under mpirun) with the CPU default statistics (``stats="auto"``: MegDet's exact two
collectives), with Chan's exact one collective (``-chan``: every rank's count, mean and M2
allgathered and merged) and with the inexact one-pass (``-1pass``), and two controls:
``cgbn-no-comm`` (CGBN's arithmetic with every collective replaced by a copy: its compute cost
alone) and ``lockstep`` (local BN whose ranks meet, with an empty shared-memory allreduce, wherever
the default CGBN's ranks meet: what synchronizing 159 times a step costs by itself). Variants run
interleaved (the order rotates every repeat), a step's time is the slower rank's, and a variant's
ratio is the median over repeats of (its step / the local step of the same repeat). A
micro-benchmark times one group allreduce of 257 doubles and one allgather of 513 per backend (the
latencies that 159 or 106 collectives per step pay). A third measurement times the local-BN step in
one process and on 2 ranks at Horovod's default 1 ms background cycle and at hvdet's 20 ms CPU
default (the thread that shares the cores with the math). Horovod's hvd.SyncBatchNorm is tried too;
it refuses CPU tensors.
Writes benchmarks/results/bn_overhead.json and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: tests.harness and hvdet from the checkout

from benchmarks.provenance import provenance
from tests.harness import run_ranks

LAUNCHERS = ("horovodrun", "mpirun")
N_BN_LAYERS = 53  # ResNet-50: per step 3 x 53 collectives (two-pass) or 2 x 53 (chan, one-pass)


def variants(mpi: bool) -> list[dict]:
    """The variants of a launch. Under horovodrun: local, the two controls (CGBN's arithmetic alone;
    local BN in CGBN's lockstep), and CGBN on the shm (default), torch (Gloo) and horovod backends.
    Under mpirun (mpi=True): local, lockstep, shm, torch and the mpi backend."""
    def v(name, backend, stats="auto", group_size=None):
        return {"name": name, "group_size": group_size, "backend": backend, "stats": stats}
    cgbn = [v("cgbn-shm", "shm"), v("cgbn-shm-chan", "shm", "chan"), v("cgbn-shm-1pass", "shm", "one_pass"),
            v("cgbn-torch", "torch")]
    local = [v("local", "auto", group_size=1), v("lockstep", "auto", group_size=1)]
    if mpi:
        return [*local, *cgbn, v("cgbn-mpi", "mpi"), v("cgbn-mpi-chan", "mpi", "chan"),
                v("cgbn-mpi-1pass", "mpi", "one_pass")]
    return [*local, v("cgbn-no-comm", "shm"), *cgbn, v("cgbn-horovod", "horovod")]


def set_mode(model, group_size, backend, stats) -> None:
    from hvdet.nn import CrossGPUBatchNorm2d

    for m in model.modules():
        if isinstance(m, CrossGPUBatchNorm2d):
            m.group_size, m.backend, m.stats = group_size, backend, stats


def _copy_allreduce(self, tensor, op="sum", backend="auto"):
    """The no-communication control: an allreduce that is a copy (local statistics only)."""
    return tensor.clone()


def _copy_allgather(self, tensor, backend="auto"):
    """The no-communication control: an allgather of this rank's part alone."""
    return tensor.clone()[None]


@contextlib.contextmanager
def no_comm(enabled: bool):
    """Group collectives become copies: CGBN's arithmetic without its collectives (local statistics)."""
    from hvdet import comm

    originals = comm.Group.allreduce, comm.Group.allgather
    if enabled:
        comm.Group.allreduce, comm.Group.allgather = _copy_allreduce, _copy_allgather
    try:
        yield
    finally:
        comm.Group.allreduce, comm.Group.allgather = originals


@contextlib.contextmanager
def lockstep(model, enabled: bool):
    """Local BN, but the ranks meet where the default (two-pass on CPU) CGBN's ranks meet: two empty shm
    allreduces after each BN forward, one in its backward. What synchronizing alone costs on this
    machine (each rank waits for the slower one 159 times a step), without CGBN's statistics or payload."""
    from hvdet import comm
    from hvdet.nn import CrossGPUBatchNorm2d

    group, token = comm.consecutive_groups(None), torch.zeros(1, dtype=torch.float64)

    def meet(*_):
        group.allreduce(token, "sum", "shm")

    def hook(module, inputs, out):
        meet(), meet()
        out.register_hook(meet)  # returns None: the gradient passes unchanged

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if enabled and isinstance(m, CrossGPUBatchNorm2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def control(model, name: str):
    """The set-up a variant needs around its steps (the two controls; nothing for the others)."""
    with no_comm(name == "cgbn-no-comm"), lockstep(model, name == "lockstep"):
        yield


def allreduce_latency_s(backend: str, calls: int = 200, batch: int = 20, op: str = "allreduce") -> float:
    """Median seconds per group allreduce of 257 float64 (a 256-channel layer's sums plus the count),
    or (op="allgather") allgather of 513 (its count, means and M2s: the default CGBN forward)."""
    from hvdet import comm

    group = comm.consecutive_groups(None)
    if op == "allreduce":
        t = torch.zeros(257, dtype=torch.float64)
        call = lambda: group.allreduce(t, "sum", backend)
    else:
        t = torch.zeros(513, dtype=torch.float64)
        call = lambda: group.allgather(t, backend)
    for _ in range(batch):  # warm-up: handles made, connections open
        call()
    per_call = []
    for _ in range(calls // batch):
        comm.barrier()
        start = time.perf_counter()
        for _ in range(batch):
            call()
        per_call.append((time.perf_counter() - start) / batch)
    return statistics.median(per_call)


def try_horovod_sync_bn() -> str:
    """Horovod's SyncBatchNorm on a CPU tensor: the error it raises (it checks before communicating)."""
    from hvdet import comm

    try:
        comm.world.hvd.SyncBatchNorm(8).train()(torch.randn(2, 8, 4, 4))
    except Exception as err:  # noqa: BLE001 - recorded verbatim
        return f"{type(err).__name__}: {err}"
    return "ran"


def backbone():
    """torchvision's ResNet-50-FPN backbone with BatchNorm2d, every layer trainable, seed 0."""
    from torch import nn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=nn.BatchNorm2d,
                               trainable_layers=5).train()


def timed_step(model, x) -> float:
    """Seconds of one forward+backward; under a launcher every rank starts it together, so the time
    is the step's, not the wait's."""
    from hvdet import comm

    if comm.is_initialized():
        comm.barrier()
    start = time.perf_counter()
    features = model(x)
    model.zero_grad(set_to_none=True)
    sum(f.mean() for f in features.values()).backward()
    return time.perf_counter() - start


def case_bench(image_size: int, images_per_gpu: int, warmup: int, repeats: int) -> dict:
    from hvdet import comm
    from hvdet.nn import convert_cross_gpu_bn

    backends = ["shm", "torch", "horovod"] + (["mpi"] if comm.mpi_available() else [])
    model = convert_cross_gpu_bn(backbone())
    x = torch.rand(images_per_gpu, 3, image_size, image_size, generator=torch.Generator().manual_seed(comm.rank()))

    todo = variants(comm.mpi_available())
    times = {v["name"]: [] for v in todo}
    for v in todo:  # warm-up, and every backend's handles made by all ranks in the same order
        set_mode(model, v["group_size"], v["backend"], v["stats"])
        with control(model, v["name"]):
            for _ in range(warmup):
                timed_step(model, x)
    for rep in range(repeats):
        for v in todo[rep % len(todo):] + todo[:rep % len(todo)]:
            set_mode(model, v["group_size"], v["backend"], v["stats"])
            with control(model, v["name"]):
                times[v["name"]].append(timed_step(model, x))
    latency = {b: allreduce_latency_s(b) for b in backends}
    gather_latency = {b: allreduce_latency_s(b, op="allgather") for b in backends}
    return {"times_s": times, "latency_s": latency, "allgather_latency_s": gather_latency,
            "controller": comm.controller(), "hvd_sync_bn": try_horovod_sync_bn(),
            "horovod_cycle_ms": os.environ.get("HOROVOD_CYCLE_TIME")}


def local_steps(image_size: int, images_per_gpu: int, warmup: int, repeats: int) -> list[float]:
    """Forward+backward seconds with torch's own BN, no group collective: what Horovod's background
    thread costs a step (run on 2 ranks at two cycle times, and in one process)."""
    torch.set_num_threads(1)
    model, x = backbone(), torch.rand(images_per_gpu, 3, image_size, image_size)
    return [timed_step(model, x) for _ in range(warmup + repeats)][warmup:]


def horovod_cycle(image_size: int, images_per_gpu: int, warmup: int, repeats: int) -> dict:
    """Median local-BN step: one process without Horovod, and 2 ranks under horovodrun at Horovod's default 1 ms cycle
    and at hvdet's CPU default (comm.init sets 20 ms when HOROVOD_CYCLE_TIME is unset)."""
    out = {"one_process_s": statistics.median(local_steps(image_size, images_per_gpu, warmup, repeats))}
    for cycle_ms in ("1", "20"):
        os.environ["HOROVOD_CYCLE_TIME"] = cycle_ms  # rank_env() hands os.environ to the launcher
        try:
            per_rank = run_ranks("benchmarks.bn_overhead:local_steps", np=2, launcher="horovodrun",
                                 image_size=image_size, images_per_gpu=images_per_gpu, warmup=warmup,
                                 repeats=repeats)
        finally:
            del os.environ["HOROVOD_CYCLE_TIME"]
        out[f"two_ranks_cycle_{cycle_ms}ms_s"] = statistics.median(max(ts) for ts in zip(*per_rank, strict=True))
    return out


class _LocalGroup:
    """A stand-in group whose collectives are copies: CGBN's arithmetic, in one process."""
    size = 2
    allreduce = _copy_allreduce
    allgather = _copy_allgather


def arithmetic_ms(image_size: int, images_per_gpu: int, repeats: int = 7) -> dict:
    """Forward+backward of the 53 BN layers alone (their real input shapes), one process, one thread:
    torch's BN kernel vs CGBN's arithmetic (collectives excluded). Less noisy than whole steps."""
    import torch.nn.functional as F
    from torch import nn

    from hvdet.nn.cross_gpu_bn import _CrossGPUBatchNormFn

    torch.set_num_threads(1)
    model = backbone()
    shapes = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.rand(images_per_gpu, 3, image_size, image_size))

    def native(x, w, b, rm, rv):
        return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    def cgbn(stats):
        return lambda x, w, b, rm, rv: _CrossGPUBatchNormFn.apply(x, w, b, rm, rv, 0.1, 1e-5, _LocalGroup(),
                                                                  "auto", stats, "auto")
    fns = {"native_ms": native, "cgbn_ms": cgbn("two_pass"), "cgbn_chan_ms": cgbn("chan"),
           "cgbn_1pass_ms": cgbn("one_pass")}
    totals = dict.fromkeys(fns, 0.0)
    for shape in shapes:
        x, dy = torch.randn(shape, requires_grad=True), torch.randn(shape)
        w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        times = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved, so load from other jobs hits all of them alike
            for k, fn in fns.items():
                start = time.perf_counter()
                fn(x, w, b, rm, rv).backward(dy)
                times[k].append(time.perf_counter() - start)
        for k in fns:
            totals[k] += 1e3 * statistics.median(times[k])
    return {"layers": len(shapes), **totals}


def summarize(per_rank: list[dict]) -> dict:
    """Per variant: median step (slower rank) and median paired ratio to local BN."""
    names = list(per_rank[0]["times_s"])
    steps = {n: [max(r["times_s"][n][i] for r in per_rank) for i in range(len(per_rank[0]["times_s"][n]))]
             for n in names}
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(steps[n], steps["local"], strict=True)]
        out[n] = {"median_step_s": statistics.median(steps[n]), "median_ratio_to_local": statistics.median(ratios),
                  "min_ratio_to_local": min(ratios), "max_ratio_to_local": max(ratios), "steps_s": steps[n]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--images-per-gpu", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--launchers", default=",".join(LAUNCHERS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bn_overhead.json"))
    args = parser.parse_args()

    report = {"machine": f"{os.cpu_count()}-core CPU VM, no GPU ({platform.processor() or platform.machine()}), "
                         "shared with other jobs",
              "provenance": provenance(), "torch": torch.__version__, "np": args.np, "threads_per_rank": 1,
              "model": "torchvision resnet_fpn_backbone('resnet50'), BatchNorm2d -> CrossGPUBatchNorm2d (53 layers)",
              "image_size": args.image_size, "images_per_gpu": args.images_per_gpu,
              "warmup": args.warmup, "repeats": args.repeats, "load_avg_start": os.getloadavg(),
              "collectives_per_step": {"chan": 2 * N_BN_LAYERS, "two_pass": 3 * N_BN_LAYERS,
                                       "one_pass": 2 * N_BN_LAYERS},
              "launches": {}}
    started = time.perf_counter()
    report["bn_arithmetic_per_step"] = arithmetic_ms(args.image_size, args.images_per_gpu)
    report["horovod_cycle"] = horovod_cycle(args.image_size, args.images_per_gpu, args.warmup, args.repeats)
    for launcher in args.launchers.split(","):
        per_rank = run_ranks("benchmarks.bn_overhead:case_bench", np=args.np, launcher=launcher,
                             image_size=args.image_size, images_per_gpu=args.images_per_gpu,
                             warmup=args.warmup, repeats=args.repeats)
        report["launches"][launcher] = {
            "controller": per_rank[0]["controller"], "variants": summarize(per_rank),
            "allreduce_latency_us": {b: 1e6 * max(r["latency_s"][b] for r in per_rank)
                                     for b in per_rank[0]["latency_s"]},
            "allgather_latency_us": {b: 1e6 * max(r["allgather_latency_s"][b] for r in per_rank)
                                     for b in per_rank[0]["allgather_latency_s"]},
            "hvd_sync_bn": per_rank[0]["hvd_sync_bn"]}
    report["load_avg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['machine']}; {report['np']} ranks x 1 thread; ResNet-50-FPN backbone, "
          f"{report['images_per_gpu']} x {report['image_size']}^2 images per rank; forward+backward")
    print(f"{'launch':<11} {'variant':<18} {'median step s':>13} {'x local BN':>10} {'(min - max)':>13} "
          f"{'allreduce / allgather us':>25}")
    for launcher, res in report["launches"].items():
        for name, v in res["variants"].items():
            backend = name.split("-")[1] if name.startswith("cgbn-") else None  # cgbn-<backend>[-chan|-1pass]
            lat, gat = res["allreduce_latency_us"].get(backend), res.get("allgather_latency_us", {}).get(backend)
            spread = f"({v['min_ratio_to_local']:.2f} - {v['max_ratio_to_local']:.2f})"
            lat_s = "" if lat is None else f"{lat:.0f} / {gat:.0f}" if gat is not None else f"{lat:.0f}"
            print(f"{launcher:<11} {name:<18} {v['median_step_s']:>13.3f} {v['median_ratio_to_local']:>10.3f} "
                  f"{spread:>13} {lat_s:>25}")
        print(f"{launcher:<11} {'hvd.SyncBatchNorm':<18} could not run: {res['hvd_sync_bn']}")
    a = report["bn_arithmetic_per_step"]
    print(f"BN arithmetic per step (1 process, collectives excluded, {a['layers']} layers): torch BN "
          f"{a['native_ms']:.0f} ms, CGBN (two-pass) {a['cgbn_ms']:.0f} ms, chan {a['cgbn_chan_ms']:.0f} ms, "
          f"one-pass {a['cgbn_1pass_ms']:.0f} ms")
    c = report["horovod_cycle"]
    print(f"Local-BN step, Horovod's background cycle: one process {c['one_process_s']:.3f} s; 2 ranks at "
          f"1 ms {c['two_ranks_cycle_1ms_s']:.3f} s, at 20 ms {c['two_ranks_cycle_20ms_s']:.3f} s")


if __name__ == "__main__":
    sys.exit(main())

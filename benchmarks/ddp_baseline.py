"""hvdet's engine against a plain PyTorch DistributedDataParallel loop on the same work.

    .venv/bin/python benchmarks/ddp_baseline.py [--rounds 3] [--iters 40] [--skip 10]
                                               [--settings ddp-1 hvdet-1 ddp-2 hvdet-horovodrun-gloo-2 ...]

The reference a user holds hvdet to: torchvision's detection references on ``torchrun`` + DDP. Both
sides train the same model (the demo's ``fasterrcnn_resnet18_fpn_fast``, local BN, the same
parameters), on the same synthetic images and batches (hvdet's dataset and ``TrainLoader``: 8
images of 128 px per rank), with the same SGD (hvdet.optim's parameter groups), one math thread per
rank. The DDP side is what its users write, with DDP's defaults (25 MB buckets, Gloo on CPU, NCCL on
GPU) and torchvision's ``train_one_epoch`` habits: the loss dict is all-reduced each iteration for
logging and checked with ``math.isfinite`` (hvdet's loss check does the same work). hvdet is
``train.py`` as a user runs it: one plain process, ``horovodrun -np 2 --gloo`` (as ``make demo``)
and ``launch/mpirun.sh -n 2``, and ``hvdet-torchrun-2``: hvdet's engine on DDP (``torchrun`` with
``comm.gradients=ddp``), which isolates the engine's cost from Horovod's; its images/s comes from
``metrics.jsonl`` (``elapsed_s`` between the records at ``--skip`` and ``--iters``: logging
included), the DDP side's from per-iteration time
stamps over the same iterations. Settings run interleaved, round after round (A B C A B C ...), so
load from other processes hits all alike; medians over rounds are reported.

Results: benchmarks/results/ddp_baseline.json (with the machine's load before and after).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT, provenance
from hvdet.config import load_config
from hvdet.report import load_run

RECIPE = "configs/synthetic_demo.yaml"
# The demo recipe made a pure throughput job: local BN and SGD (what a DDP user has), no evaluation,
# no target, no periodic checkpoint, logging at the demo's interval.
OVERRIDES = ["model.norm=local", "solver.optimizer=sgd", "solver.base_lr=0.02", "solver.warmup_iters=0",
             "solver.steps=[]", "eval.interval=0", "eval.at_end=false", "checkpoint.interval=0", "target={}",
             "log.progress=false", "log.tensorboard=false", "log.interval=10"]
SETTINGS = ("ddp-1", "hvdet-1", "ddp-2", "hvdet-horovodrun-gloo-2", "hvdet-horovodrun-mpi-2", "hvdet-mpirun-2",
            "hvdet-torchrun-2")
PY = sys.executable


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return e


def command(setting: str, overrides: list[str], out: Path) -> list[str]:
    impl, *launcher, np_ = setting.split("-")
    if impl == "ddp":
        return [str(Path(PY).parent / "torchrun"), "--standalone", f"--nproc_per_node={np_}", __file__,
                "--worker", str(out), *overrides]
    train = [PY, "train.py", "--config", RECIPE, *overrides]
    if np_ == "1":
        return train
    if launcher[0] == "torchrun":  # hvdet's engine with DDP's gradients
        return [str(Path(PY).parent / "torchrun"), "--standalone", f"--nproc_per_node={np_}", *train[1:],
                "comm.gradients=ddp"]
    if launcher[0] == "horovodrun":  # horovodrun-gloo | horovodrun-mpi: the controller
        return [str(Path(PY).parent / "horovodrun"), "-np", np_, "-H", f"localhost:{np_}", f"--{launcher[1]}", *train]
    return ["bash", "launch/mpirun.sh", "-n", np_, "--", *train]


def measure(setting: str, iters: int, skip: int, data_root: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="hvdet-ddp-") as tmp:
        out = Path(tmp) / "run"
        overrides = [*OVERRIDES, f"solver.max_iters={iters}", f"data.root={data_root}", f"output_dir={out}", *extra]
        proc = subprocess.run(command(setting, overrides, out), cwd=ROOT, env=env(), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            logs = "".join(f"\n{f}:\n{f.read_text()[-2000:]}" for f in sorted(out.glob("errors/*.log")))
            raise RuntimeError(f"{setting} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}{logs}")
        train = {r["iteration"]: r for r in load_run(out).train}
    window = [r for i, r in train.items() if skip < i <= iters]
    phases = {k: statistics.fmean(r[k] for r in window)
              for k in ("data_s", "forward_s", "backward_allreduce_s", "optimizer_s")}
    batch = load_config(str(ROOT / RECIPE), overrides).data.images_per_gpu * int(setting.rsplit("-", 1)[1])
    return {"images_per_s": (iters - skip) * batch / (train[iters]["elapsed_s"] - train[skip]["elapsed_s"]), **phases}


# ---------------------------------------------------------------------------------------------
# The DDP worker (started by torchrun): torchvision's reference loop on hvdet's model and data
# ---------------------------------------------------------------------------------------------

def worker(out: Path, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from hvdet.builders import build_dataset, build_model
    from hvdet.data.loader import TrainLoader
    from hvdet.optim import build_optimizer

    cfg = load_config(str(ROOT / RECIPE), overrides)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg, train=True)
    model = build_model(cfg, dataset.num_classes, world).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    s = cfg.solver
    opt = build_optimizer(model.module, "sgd", s.base_lr, s.weight_decay, momentum=s.momentum)
    loader = TrainLoader(dataset, cfg.data.images_per_gpu, rank, world, seed=cfg.seed,
                         num_workers=cfg.data.num_workers)
    records, phases, start = [], {"data_s": 0.0, "forward_s": 0.0, "backward_allreduce_s": 0.0, "optimizer_s": 0.0}, \
        time.perf_counter()

    def tick(name: str, t0: float) -> float:
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        phases[name] += t1 - t0
        return t1

    n = 0
    for iteration in range(1, s.max_iters + 1):
        t = time.perf_counter()
        images, targets = next(loader)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in tt.items()}
                   for tt in targets]
        t = tick("data_s", t)
        loss_dict = model(images, targets)
        t = tick("forward_s", t)
        losses = sum(loss_dict.values())
        # torchvision references/detection/utils.reduce_dict + the isfinite check, every iteration.
        reduced = torch.stack([v.detach() for v in loss_dict.values()])
        dist.all_reduce(reduced)
        if not math.isfinite(reduced.sum().item() / world):
            raise RuntimeError(f"loss is not finite at iteration {iteration}")
        opt.zero_grad()
        losses.backward()
        t = tick("backward_allreduce_s", t)
        opt.step()
        tick("optimizer_s", t)
        n += 1
        if iteration % cfg.log.interval == 0:
            records.append({"type": "train", "iteration": iteration, "elapsed_s": time.perf_counter() - start,
                            **{k: v / n for k, v in phases.items()}})
            phases, n = dict.fromkeys(phases, 0.0), 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="warm-up iterations left out (a multiple of log.interval)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--data", default="data/synthetic", help="written with the demo's dataset if missing")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ddp_baseline.json"))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="more key=value overrides for both sides")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.overrides)
    if not (ROOT / args.data / "annotations/instances_val.json").exists():
        from hvdet.data.synthetic import make_synthetic_coco
        make_synthetic_coco(ROOT / args.data, num_train=1024, num_val=128, image_size=128, seed=0)
    before = provenance()
    samples = {s: [] for s in args.settings}
    for r in range(args.rounds):
        for s in args.settings:
            samples[s].append(measure(s, args.iters, args.skip, args.data, args.overrides))
            print(f"round {r + 1}/{args.rounds} {s:20s} {samples[s][-1]['images_per_s']:6.1f} images/s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    results = summarize(samples)
    doc = {"benchmark": "hvdet engine vs a PyTorch DDP loop, same model/data/optimizer", "iters": args.iters,
           "skip": args.skip, "rounds": args.rounds, "overrides": [*OVERRIDES, *args.overrides],
           "machine": os.uname().machine + f", {os.cpu_count()} cores", "provenance_before": before,
           "provenance_after": provenance(), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print_table(results)


def summarize(samples: dict) -> dict:
    results = {}
    for s, runs in samples.items():
        results[s] = {"images_per_s_median": statistics.median(r["images_per_s"] for r in runs),
                      "images_per_s": [round(r["images_per_s"], 2) for r in runs],
                      **{k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}}
    for impl in ("ddp", "hvdet"):
        one = results.get(f"{impl}-1")
        for s, r in results.items():
            if one and s.startswith(impl) and s.endswith("-2"):
                r["scaling_1_to_2"] = r["images_per_s_median"] / one["images_per_s_median"]
    if "ddp-2" in results:
        for s, r in results.items():
            if s.startswith("hvdet") and s.endswith("-2"):
                r["vs_ddp_2"] = r["images_per_s_median"] / results["ddp-2"]["images_per_s_median"]
    if "ddp-1" in results and "hvdet-1" in results:
        results["hvdet-1"]["vs_ddp_1"] = (results["hvdet-1"]["images_per_s_median"]
                                          / results["ddp-1"]["images_per_s_median"])
    return results


def print_table(results: dict) -> None:
    print(f"\n{'setting':20s} {'images/s':>9s} {'scaling':>8s} {'vs DDP':>7s}  "
          "data / forward / backward+allreduce / optimizer s")
    for s, r in results.items():
        ratio = r.get("vs_ddp_2", r.get("vs_ddp_1"))
        print(f"{s:20s} {r['images_per_s_median']:9.1f} {r.get('scaling_1_to_2', float('nan')):8.2f} "
              f"{ratio if ratio is not None else float('nan'):7.2f}  "
              + " / ".join(f"{r.get(k, float('nan')):.3f}"
                           for k in ("data_s", "forward_s", "backward_allreduce_s", "optimizer_s")))


if __name__ == "__main__":
    main()

"""The time model (``hvdet project``) against a cluster whose links we shape: launch/testcluster.py's hosts.

    python benchmarks/cluster_scaling.py [--rates none 1gbit 300mbit 100mbit] [--iterations 12]
                                         [--out benchmarks/results/cluster_scaling.json]     (root)

For each link rate (tc tbf on both ends of every host's veth; this kernel has no netem, so latency is
the veth's own), on 2 hosts x 1 rank:

1. **the link**: a TCP stream's throughput from hvdet-h1 to hvdet-h2 and the TCP connect time
   (one round trip); these two numbers, and nothing measured with Horovod, make the model's preset;
2. **Horovod's allreduce** of the demo model's gradient bytes (and of 4 KB, the latency floor) under
   horovodrun's Gloo controller, the median of ``--reps`` after a warm-up;
3. **the training step**: train.py (the demo recipe at 64 px, 2 images per rank, Cross-GPU BN over
   both ranks) for ``--iterations``, the median of the run log's phases.

Predictions: the model's ``allreduce_s`` for (2), and for (3) ``measured.calibrate`` from a 1-rank
run of the same recipe on one host (its compute and backward) through Horovod's simulated fusion
loop, with the preset built from (1). The printed error is predicted / measured - 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import ROOT, provenance
from hvdet.timemodel import measured
from hvdet.timemodel.model import PHASES, Horovod, Link, System, allreduce_s, horovod_schedule
from hvdet.timemodel.presets import BN_COLLECTIVES, MODELS, SYSTEMS
from tests.cluster import launch_on

CLUSTER = [sys.executable, str(ROOT / "launch" / "testcluster.py")]
ARCH = "fasterrcnn_resnet18_fpn_fast"
GRAD_BYTES = MODELS[ARCH].params * 4
GLOO_HOROVOD = Horovod(cycle_s=20e-3)  # hvdet's Horovod cycle under the Gloo controller (horovod_env)
PORT = 5399


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=str(ROOT))
    return e


def on(host: int, cmd: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` on host ``host`` over ssh, in the checkout, with the rank environment (tests/cluster.py's)."""
    return subprocess.run(launch_on(cmd, on=host, env=env()), capture_output=True, text=True, timeout=timeout_s,
                          check=False)


# -- 1. the link --------------------------------------------------------------------------------------

RECEIVER = f"""
import socket, time, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", {PORT})); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""
SENDER = f"""
import socket, sys
c = socket.create_connection(("10.77.0.2", {PORT})); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[1])): c.sendall(buf)
c.close()
"""


def link(megabytes: int) -> dict:
    recv = subprocess.Popen(["ip", "netns", "exec", "hvdet-h2", sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                            text=True)
    assert recv.stdout.readline().strip() == "ready"
    subprocess.run(["ip", "netns", "exec", "hvdet-h1", sys.executable, "-c", SENDER, str(megabytes)], check=True)
    n, seconds = recv.stdout.readline().split()
    recv.wait(30)
    status = json.loads(subprocess.run([*CLUSTER, "status"], capture_output=True, text=True, check=True).stdout)
    rtt_ms = statistics.median(h["tcp_connect_ms"] for h in status["hosts"][:2])
    return {"throughput_Bps": int(n) / float(seconds), "tcp_connect_ms": rtt_ms}


# -- 2. Horovod's allreduce ---------------------------------------------------------------------------

def probe(nbytes: int, reps: int) -> None:
    """(Run on each rank by horovodrun.) Median seconds of ``reps`` allreduces of ``nbytes``, on rank 0."""
    import torch

    from hvdet import comm

    comm.init()
    x = torch.ones(nbytes // 4)
    times = []
    phase = random.Random(0)  # the same draws on both ranks: they submit together
    for i in range(reps + 2):
        comm.barrier()
        # A barrier ends just after a Horovod cycle began: submitting at once would always wait a whole
        # cycle. A random part of a cycle first makes the phase uniform, as it is in training (and in
        # the model, which averages over it).
        time.sleep(phase.uniform(0, GLOO_HOROVOD.cycle_s))
        t0 = time.perf_counter()
        comm.allreduce(x, op="sum", name=f"probe.{i}")
        times.append(time.perf_counter() - t0)
    if comm.rank() == 0:
        print("PROBE", json.dumps({"median_s": statistics.median(times[2:]), "min_s": min(times[2:])}), flush=True)


def horovod_allreduce(nbytes: int, reps: int) -> dict:
    out = on(1, ["horovodrun", "-np", "2", "-H", "hvdet-h1:1,hvdet-h2:1", "--gloo", "python",
                 "benchmarks/cluster_scaling.py", "--probe", str(nbytes), str(reps)])
    line = next((x for x in out.stdout.splitlines() if "PROBE " in x), None)
    if line is None:
        raise RuntimeError(f"allreduce probe failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(line.split("PROBE ", 1)[1])


# -- 3. the training step -----------------------------------------------------------------------------

def train_args(data: Path, out: Path, iterations: int) -> list[str]:
    keys = {"data.root": data, "data.images_per_gpu": 2, "data.num_workers": 0, "data.min_sizes": "[64]",
            "data.max_size": 64, "solver.max_iters": iterations, "solver.steps": "[]", "solver.warmup_iters": 1,
            "eval.interval": 0, "eval.at_end": "false", "log.interval": 1, "log.progress": "false",
            "checkpoint.interval": 0, "output_dir": out}
    return ["train.py", "--config", "configs/synthetic_demo.yaml", *(f"{k}={v}" for k, v in keys.items())]


def train(data: Path, out: Path, iterations: int, ranks: int) -> measured.Measured:
    if ranks == 1:
        cmd = ["python", *train_args(data, out, iterations)]
    else:
        cmd = ["horovodrun", "-np", "2", "-H", "hvdet-h1:1,hvdet-h2:1", "--gloo", "python",
               *train_args(data, out, iterations)]
    proc = on(1, cmd)
    if proc.returncode:
        raise RuntimeError(f"training failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return measured.load(str(out))


# -- the model's prediction ---------------------------------------------------------------------------

def preset(name: str, link_: dict) -> System:
    """The test cluster as the model sees it: one rank per node; the network is the measured TCP
    stream, but no faster than Gloo moves data on these CPUs (the cpu-vm preset's 1 GB/s: a link
    faster than the host's copies and sums does not make the allreduce faster); one way's latency
    (half the connect round trip) added to the cpu-vm preset's per-hop Gloo cost (0.6 ms, software)."""
    vm = SYSTEMS["cpu-vm"]
    hop = vm.inter.latency_s + link_["tcp_connect_ms"] / 2e3
    net = Link(min(link_["throughput_Bps"], vm.inter.bandwidth_Bps), hop)
    return replace(vm, name=name, gpus_per_node=1, intra=net, inter=net,
                   source=f"launch/testcluster.py link: {link_['throughput_Bps'] * 8 / 1e9:.2f} Gbit/s, "
                          f"{link_['tcp_connect_ms']:.3f} ms TCP connect")


def lone_allreduce_s(nbytes: int, system: System, horovod: Horovod) -> float:
    """The model's time for one allreduce submitted alone through Horovod: its background loop
    (the wait for the next cycle, averaged over the cycle's phase) and the ring's time."""
    runs = [horovod_schedule(nbytes, 0.0, horovod, lambda b: allreduce_s(b, 2, system, "ring"),
                             k * horovod.cycle_s / PHASES) for k in range(PHASES)]
    return sum(r.exposed_s for r in runs) / PHASES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rates", nargs="+", default=["none", "1gbit", "300mbit", "100mbit"])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster_scaling.json"))
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe)
        return 0
    subprocess.run([*CLUSTER, "up", "--hosts", "2"], check=True)
    results = {"provenance": provenance(), "uptime_before": _uptime(), "arch": ARCH, "grad_bytes": GRAD_BYTES,
               "horovod": {"controller": "gloo", "cycle_s": GLOO_HOROVOD.cycle_s,
                           "fusion_bytes": GLOO_HOROVOD.fusion_bytes},
               "rates": {}}
    with tempfile.TemporaryDirectory(prefix="hvdet-cluster-scaling-") as tmp:
        from hvdet.data.synthetic import make_synthetic_coco

        data = Path(make_synthetic_coco(Path(tmp) / "data", num_train=32, num_val=4,
                                        image_size=64)["train_ann"]).parent.parent
        subprocess.run([*CLUSTER, "shape", "--rate", "none"], check=True)
        one = train(data, Path(tmp) / "one", args.iterations, 1)
        print(f"1 rank on one host: step {one.step_s * 1e3:.0f} ms (backward {one.backward_s * 1e3:.0f} ms)",
              flush=True)
        results["one_rank"] = {"step_s": one.step_s, "backward_s": one.backward_s}
        for rate in args.rates:
            subprocess.run([*CLUSTER, "shape", "--rate", rate], check=True)
            link_ = link(64 if rate in ("none", "1gbit") else 16)
            system = preset(f"testcluster-{rate}", link_)
            big, small = horovod_allreduce(GRAD_BYTES, args.reps), horovod_allreduce(4096, args.reps)
            many = train(data, Path(tmp) / f"two-{rate}", args.iterations, 2)
            cal = measured.calibrate(one, many, system, GLOO_HOROVOD, MODELS[ARCH].params,
                                     bn_layers=MODELS[ARCH].bn_layers, bn_collectives=BN_COLLECTIVES["two_pass"],
                                     bn_group=2)  # bn.stats auto = two_pass on CPU tensors
            row = {"link": link_,
                   "preset": {"bandwidth_Bps": system.inter.bandwidth_Bps, "hop_s": system.inter.latency_s},
                   "allreduce_grad": {"measured_s": big["median_s"],
                                      "predicted_s": lone_allreduce_s(GRAD_BYTES, system, GLOO_HOROVOD)},
                   "allreduce_4kb": {"measured_s": small["median_s"],
                                     "predicted_s": lone_allreduce_s(4096, system, GLOO_HOROVOD)},
                   "step": {"measured_s": many.step_s, "predicted_s": cal.predicted_s, "compute_s": cal.compute_s,
                            "cgbn_s": cal.cgbn_s, "exposed_s": cal.exposed_s}}
            for part in ("allreduce_grad", "allreduce_4kb", "step"):
                row[part]["error"] = row[part]["predicted_s"] / row[part]["measured_s"] - 1
            results["rates"][rate] = row
            print(f"{rate:>8}: link {link_['throughput_Bps'] * 8 / 1e9:6.2f} Gbit/s, "
                  f"connect {link_['tcp_connect_ms']:.3f} ms | "
                  + " | ".join(f"{p} measured {row[p]['measured_s'] * 1e3:8.1f} ms, predicted "
                               f"{row[p]['predicted_s'] * 1e3:8.1f} ms ({row[p]['error']:+.0%})"
                               for p in ("allreduce_grad", "allreduce_4kb", "step")), flush=True)
        subprocess.run([*CLUSTER, "shape", "--rate", "none"], check=True)
    results["uptime_after"] = _uptime()
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())

"""Smoke test for a cluster or a container: every rank allreduces its rank number.

    horovodrun -np 2 -H localhost:2 --gloo python launch/allreduce_check.py
    mpirun -np 2 python launch/allreduce_check.py
    horovodrun -np 1 -H localhost:1 --gloo python launch/allreduce_check.py --backends   # one GPU too

Prints one line per rank and exits non-zero when the sum is wrong. ``--backends`` then also sends a
gradient-like group of tensors through Horovod itself (in fp32, and fp16-compressed as
``solver.fp16_allreduce`` does), even in a world of one, and prints on rank 0 the backends that
Horovod's timeline says reduced them, as one JSON line: ``NCCL_ALLREDUCE`` on GPUs with an NCCL build
of Horovod, ``GLOO_ALLREDUCE`` or ``MPI_ALLREDUCE`` otherwise.
"""
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import torch

from hvdet import comm

# Sizes of a few gradients: a bias, a small conv, a large one (bigger than one fusion-buffer slice).
GROUP_NUMELS = (3, 4608, 2_359_296)


def backends() -> dict:
    """The backends and fusion copies Horovod's timeline names for a grouped allreduce on this rank's
    device, and whether each sum came out exact (rank + 1 summed: small integers, exact in fp16)."""
    n, r, device = comm.size(), comm.rank(), comm.device()
    group = [torch.full((numel,), float(r + 1), device=device) for numel in GROUP_NUMELS]
    expected = n * (n + 1) / 2
    report = {"device": str(device), "size": n, "build": comm.build_info(), "exact": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "timeline.json")
        with comm.timeline(path):
            for compression in ("none", "fp16"):
                out = comm.grouped_allreduce(group, compression=compression, name=f"hvdet.check.{compression}")
                report["exact"][compression] = all(bool((t == expected).all()) for t in out)
            comm.barrier()  # every rank's allreduces are in the timeline before rank 0 closes it
        # Rank 0, the coordinator, writes the timeline: a stream of chrome-tracing events whose
        # activity names are upper-case words.
        text = Path(path).read_text() if r == 0 else ""
    report["activities"] = sorted(set(re.findall(r'"name": ?"([A-Z][A-Z0-9_]+)"', text)))
    report["allreduce_backends"] = [a for a in report["activities"]
                                    if a.endswith("_ALLREDUCE") and not a.startswith("NEGOTIATE")]
    return report


def main() -> int:  # extra arguments (a SLURM or launcher command line) are ignored
    if "--backends" in sys.argv[1:]:
        os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")  # read by Horovod's init: comm.timeline needs it
    comm.init()
    r, n = comm.rank(), comm.size()
    x = torch.tensor([float(r)], device=comm.device())
    total = comm.allreduce(x, op="sum").item()
    expected = n * (n - 1) / 2
    ok = total == expected
    print(f"rank {r}/{n} local_rank {comm.local_rank()} host {socket.gethostname()} controller {comm.controller()} "
          f"device {comm.device()} allreduce sum {total:g} (expected {expected:g}) {'OK' if ok else 'WRONG'}",
          flush=True)
    if "--backends" in sys.argv[1:]:
        report = backends()
        ok = ok and all(report["exact"].values()) and (r != 0 or bool(report["allreduce_backends"]))
        if r == 0:
            print("backends: " + json.dumps(report), flush=True)
    comm.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

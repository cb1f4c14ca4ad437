"""Smoke test for a cluster or a container: every rank allreduces its rank number.

    horovodrun -np 2 -H localhost:2 --gloo python launch/allreduce_check.py
    mpirun -np 2 python launch/allreduce_check.py

Prints one line per rank and exits non-zero when the sum is wrong.
"""
import socket
import sys

import torch

from hvdet import comm


def main() -> int:  # extra arguments (a SLURM or launcher command line) are ignored
    comm.init()
    r, n = comm.rank(), comm.size()
    x = torch.tensor([float(r)], device=comm.device())
    total = comm.allreduce(x, op="sum").item()
    expected = n * (n - 1) / 2
    ok = total == expected
    print(f"rank {r}/{n} local_rank {comm.local_rank()} host {socket.gethostname()} controller {comm.controller()} "
          f"device {comm.device()} allreduce sum {total:g} (expected {expected:g}) {'OK' if ok else 'WRONG'}",
          flush=True)
    comm.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

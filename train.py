"""Train a detector: ``python train.py --config FILE [key=value ...] [--resume CKPT] [--eval-only CKPT]``.

Runs as one plain process, or one process per GPU under ``horovodrun -np N`` / ``mpirun -np N``, or
under ``torchrun --nproc_per_node N`` with ``comm.gradients=ddp`` (DistributedDataParallel, no Horovod).
"""
import sys

from hvdet.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))

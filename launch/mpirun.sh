#!/usr/bin/env bash
# Multi-node training with Open MPI's mpirun, one rank per GPU, with the flags Horovod recommends.
#
#   launch/mpirun.sh [-f HOSTFILE] [-n NP] -- python train.py --config configs/megdet_256.yaml
#
# Why each flag:
#   -bind-to none -map-by slot   Horovod/PyTorch start their own threads (data loaders, background
#                                 cycle); binding every rank to one core starves them.
#   -x VAR                        mpirun does not forward the environment to remote nodes by itself:
#                                 NCCL settings, LD_LIBRARY_PATH (CUDA, NCCL), PATH and PYTHONPATH.
#   -mca pml ob1 -mca btl ^openib Open MPI's TCP/shared-memory path for Horovod's small control
#                                 messages; GPU tensors travel over NCCL (InfiniBand/NVLink) anyway,
#                                 and the openib BTL is deprecated and noisy.
#   --allow-run-as-root           only when run as root (containers).
set -euo pipefail
HOSTFILE=""
NP=""
while [ $# -gt 0 ]; do
  case "$1" in
    -f|--hostfile) HOSTFILE=$2; shift 2 ;;
    -n|-np) NP=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "mpirun.sh: unknown option $1 (put the training command after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: launch/mpirun.sh [-f HOSTFILE] [-n NP] -- COMMAND..." >&2; exit 2; }
ARGS=(-bind-to none -map-by slot -mca pml ob1 -mca btl ^openib)
if [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || { echo "mpirun.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  ARGS+=(--hostfile "$HOSTFILE")
fi
[ -n "$NP" ] && ARGS+=(-np "$NP")
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
# Containers usually deny the ptrace-based single-copy path of shared memory.
[ -f /.dockerenv ] || [ -n "${HVDET_IN_CONTAINER:-}" ] && ARGS+=(-mca btl_vader_single_copy_mechanism none)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export HOROVOD_FUSION_THRESHOLD=${HOROVOD_FUSION_THRESHOLD:-134217728}
for v in NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA LD_LIBRARY_PATH PATH PYTHONPATH OMP_NUM_THREADS \
         HOROVOD_FUSION_THRESHOLD HOROVOD_CYCLE_TIME HVDET_MASTER_ADDR; do
  [ -n "${!v:-}" ] && ARGS+=(-x "$v")
done
# Preemption (SLURM's warning signal, Ctrl-C, kill): mpirun forwards SIGUSR1 to every rank, and hvdet
# stops all ranks after the same iteration with a checkpoint. A SIGTERM to mpirun itself would give
# the ranks 1 s (odls_base_sigkill_timeout) before SIGKILL, too little to write a checkpoint. The
# first failing rank's exit code comes through (launch/supervise.sh).
# shellcheck source=launch/supervise.sh
source "$(dirname "$0")/supervise.sh"
ARGS+=(-x HVDET_EXIT_FILE)
supervise USR1 mpirun "${ARGS[@]}" "$@"

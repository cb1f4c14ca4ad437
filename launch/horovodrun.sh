#!/usr/bin/env bash
# Multi-node training with horovodrun, one rank per GPU.
#
#   launch/horovodrun.sh [-f HOSTFILE] [-n NP] [--gloo|--mpi] [-i NIC] -- python train.py --config configs/largedet_fast_320.yaml
#
# HOSTFILE lines are "host slots=N", nothing else (horovodrun rejects comments); see
# launch/hostfile.dgx2.example: 10 DGX-2 nodes x 16 GPUs = 160 ranks, LargeDet's batch 320 at 2 images/GPU;
# NP defaults to the sum of the slots. The controller is horovodrun's choice unless --gloo or --mpi is
# given; -i names the network interface for Horovod's own traffic (e.g. ib0), and NCCL's is set
# with NCCL_SOCKET_IFNAME in the environment, which horovodrun forwards to every rank.
# The same checkout and virtualenv must exist at the same path on every node (or use the Docker image).
set -euo pipefail
HOSTFILE=launch/hostfile.dgx2.example
NP=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -f|--hostfile) HOSTFILE=$2; shift 2 ;;
    -n|-np) NP=$2; shift 2 ;;
    --gloo|--mpi) EXTRA+=("$1"); shift ;;
    -i|--network-interface) EXTRA+=(--network-interface "$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "horovodrun.sh: unknown option $1 (put the training command after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: launch/horovodrun.sh [-f HOSTFILE] [-n NP] [--gloo|--mpi] -- COMMAND..." >&2; exit 2; }
[ -f "$HOSTFILE" ] || { echo "horovodrun.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
if [ -z "$NP" ]; then
  NP=$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); s += n } END { print s }' "$HOSTFILE")
fi
HOROVODRUN=${HOROVODRUN:-$(command -v horovodrun || echo "$(dirname "$0")/../.venv/bin/horovodrun")}
# Fail fast instead of waiting on a node that cannot be reached.
export HOROVOD_START_TIMEOUT=${HOROVOD_START_TIMEOUT:-120}
# Large models: fuse small gradients into 128 MB allreduce buffers. The cycle time (and, on CPU
# hosts, MPI's yield) is hvdet.comm's default unless set here (hvdet.comm.horovod_env.horovod_defaults).
export HOROVOD_FUSION_THRESHOLD=${HOROVOD_FUSION_THRESHOLD:-134217728}
# Preemption: horovodrun forwards SIGTERM to every rank and kills them 5 s later; hvdet stops all
# ranks after the same iteration with a checkpoint (a larger model may need mpirun.sh, which has no
# such limit). The first failing rank's exit code comes through (launch/supervise.sh).
# shellcheck source=launch/supervise.sh
source "$(dirname "$0")/supervise.sh"
supervise TERM "$HOROVODRUN" -np "$NP" --hostfile "$HOSTFILE" "${EXTRA[@]}" "$@"

#!/usr/bin/env bash
# Host discovery for Horovod elastic (horovodrun --host-discovery-script): prints "host:slots" lines,
# one per host that may run ranks now. horovodrun calls it every few seconds; a host that disappears
# from it (or whose rank fails: Horovod then blacklists the host) leaves the job, which continues on
# the others from its last commit (hvdet.comm.elastic).
#
#   HVDET_HOSTS_FILE   a file of "host:slots" lines that the cluster's tooling keeps current
#                      (default: launch/hosts.elastic, else localhost with one slot per core)
#
#   horovodrun -np 8 --min-np 4 --max-np 8 --host-discovery-script launch/discover_hosts.sh \
#     python train.py --config configs/synthetic_demo.yaml elastic.enabled=true
set -euo pipefail
FILE=${HVDET_HOSTS_FILE:-$(dirname "$0")/hosts.elastic}
if [ -f "$FILE" ]; then
  grep -Ev '^[[:space:]]*(#|$)' "$FILE"
else
  echo "localhost:$(nproc)"
fi

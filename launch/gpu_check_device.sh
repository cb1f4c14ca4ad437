#!/usr/bin/env bash
# What the lent GPU machine runs (docs/gpu.md): the wheels launch/gpu_wheels.sh left in .whl/ (Horovod
# built for that machine's Python and torch, pycocotools, faster-coco-eval, mlperf-logging) installed
# beside its own PyTorch, then `make gpu-check`'s script, with its JSON and log under $OUT.
#
#   bash launch/gpu_check_device.sh [gpu_check.py options]      (the device call carries .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  # --no-deps: everything they need is in that image already; --target: its own site-packages stay as they are.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check_device.sh: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
else
  echo "gpu_check_device.sh: no .whl/ here (run launch/gpu_wheels.sh and carry .whl): no Horovod part, no demo"
fi
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

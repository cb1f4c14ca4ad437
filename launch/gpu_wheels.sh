#!/usr/bin/env bash
# The wheels that `make gpu-check` needs on the lent GPU machine and that machine cannot fetch (it has no
# network), built or downloaded here into .whl/ (git-ignored; about 22 MB): Horovod 0.28.1 built for its
# Python and torch, and pycocotools, faster-coco-eval and mlperf-logging. docs/gpu.md gives the one
# device command that carries .whl/, installs them there with --no-deps --target, and runs the check.
#
# Why a build of our own: that machine's image (docs/gpu.md, the tool library's KINDS.md) has Python
# 3.12.3, torch 2.11.0+cu130, triton 3.6.0 and CUDA 13.0, no Horovod and no MPI library in its package
# list, and a Horovod wheel is a C++ extension bound to one Python and one torch: the one `make setup`
# caches (Python 3.11, torch 2.14.1) cannot load there. So this script makes the same stack here, once, cached under HVDET_CACHE:
#   1. CPython 3.12.3 from its release tarball (this Debian has 3.11 only, and python.org is out of reach:
#      Ubuntu noble's source package carries the same tarball; its sha256 is the release's), ~3 min;
#   2. a venv with torch 2.11.0, torchvision 0.26.0, triton 3.6.0 and hvdet's dependencies (torch 2.11
#      pins nvidia-nccl-cu13 2.28.9, which the registry does not offer: the venv takes 2.32.6; Horovod
#      calls only NCCL functions that 2.28 has, and loads the lent machine's libnccl at run time; numpy
#      below 2.4: triton 3.6's interpreter int()s one-element arrays, which numpy 2.4 refuses), ~3 min;
#   3. Horovod in that venv by launch/build_horovod.sh, Gloo + CUDA + NCCL for sm_80/sm_90, without MPI
#      (HVDET_HOROVOD_MPI=0: a wheel with MPI links libmpi, which that image may lack; horovodrun --gloo
#      needs none), ~5 min on 2 cores.
# The venv doubles as a rehearsal of the lent machine's stack on this CPU (make gpu-rehearsal).
#
# Usage: launch/gpu_wheels.sh        (make gpu-wheels; idempotent: a second run takes seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${HVDET_CACHE:-$HOME/.cache/hvdet}
PY_VERSION=3.12.3
PY_TARBALL_URL=http://archive.ubuntu.com/ubuntu/pool/main/p/python3.12/python3.12_${PY_VERSION}.orig.tar.xz
PY_TARBALL_SHA256=56bfef1fdfc1221ce6720e43a661e3eb41785dd914ce99698d8c7896af4bdaa1  # = python.org's Python-3.12.3.tar.xz
PREFIX=$CACHE/cpython-$PY_VERSION
VENV=$CACHE/venv-gpu-py312
OUT=.whl
die() { echo "gpu_wheels.sh: error: $*" >&2; exit 1; }

# hvdet's requirements as setup.py lists them (one list, not a copy here): the names given, or all but
# torch and torchvision, whose lent-machine versions this script installs itself.
hvdet_requires() {
  "$PREFIX/bin/python3.12" - "$@" <<'PY'
import ast, re, sys
setup = next(n for n in ast.walk(ast.parse(open("setup.py").read()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
reqs = ast.literal_eval(next(k.value for k in setup.keywords if k.arg == "install_requires"))
name = {r: re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in reqs}
wanted = sys.argv[1:]
print("\n".join(r for r in reqs if (name[r] in wanted if wanted else name[r] not in ("torch", "torchvision"))))
PY
}

# --- 1. Python 3.12.3 ------------------------------------------------------------------------
if ! "$PREFIX/bin/python3.12" -c "import ssl, sqlite3, lzma, bz2, ctypes, zlib" 2>/dev/null; then
  # The headers CPython's ssl, lzma, bz2, ctypes and sqlite3 modules build against (pip needs ssl).
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev zlib1g-dev libffi-dev \
    libbz2-dev liblzma-dev libsqlite3-dev >/dev/null
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  echo "building CPython $PY_VERSION into $PREFIX (about 3 min on 2 cores)"
  curl -fsS -o "$SRC/python.tar.xz" "$PY_TARBALL_URL" || die "could not download $PY_TARBALL_URL"
  echo "$PY_TARBALL_SHA256  $SRC/python.tar.xz" | sha256sum -c --quiet - || die "$PY_TARBALL_URL: wrong sha256"
  tar xJf "$SRC/python.tar.xz" -C "$SRC"
  (cd "$SRC/Python-$PY_VERSION" && ./configure -q --prefix="$PREFIX" --with-ensurepip=install >/dev/null \
     && make -s -j"$(nproc)" >/dev/null 2>&1 && make -s install >/dev/null 2>&1) || die "building CPython $PY_VERSION failed"
fi

# --- 2. The lent machine's torch stack in a venv -----------------------------------------------
if ! "$VENV/bin/python" -c "import torch, torchvision, triton, pycocotools, mlperf_logging, faster_coco_eval, pytest
import numpy
assert torch.__version__ == '2.11.0+cu130' and triton.__version__ == '3.6.0' and tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4)" 2>/dev/null; then
  "$PREFIX/bin/python3.12" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q)
  "${PIP[@]}" --upgrade pip wheel "setuptools<82"
  # torch without its pins (see 2. above), then its dependencies by name at what the registry has.
  "${PIP[@]}" --no-deps torch==2.11.0 torchvision==0.26.0 triton==3.6.0
  "${PIP[@]}" filelock "typing-extensions>=4.10.0" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" \
    "cuda-bindings>=13.0.3,<14" nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime \
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse \
    nvidia-cusparselt-cu13 nvidia-nccl-cu13==2.32.6 nvidia-nvjitlink nvidia-nvshmem-cu13==3.4.5 nvidia-nvtx \
    $(hvdet_requires) "numpy<2.4" "pytest>=8" "pytest-timeout>=2.3" 2>&1 | grep -v "dependency conflicts\|requires nvidia\|requires cuda-toolkit\|resolver does not" || true
  "$VENV/bin/python" -c "import torch; assert torch.__version__ == '2.11.0+cu130', torch.__version__" \
    || die "the torch 2.11.0 venv at $VENV does not import torch"
fi

# --- 3. Horovod for it --------------------------------------------------------------------------
PYTHON=$VENV/bin/python HVDET_HOROVOD_MPI=0 launch/build_horovod.sh
HOROVOD_WHEEL=$(ls "$CACHE"/wheels/horovod-0.28.1-torch2.11.0+cu130-cp312-cuda13.0-sm*-nompi/horovod-*.whl | head -1)

# --- .whl/ --------------------------------------------------------------------------------------
rm -rf "$OUT" && mkdir -p "$OUT"
cp "$HOROVOD_WHEEL" "$OUT"/
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" \
  $(hvdet_requires pycocotools faster-coco-eval mlperf-logging)
grep -qx "/.whl/" .gitignore || die ".whl/ must be git-ignored (it is carried to the device, never committed)"
echo "gpu_wheels.sh: $(du -sh "$OUT" | cut -f1) in $OUT/ for the lent GPU machine:"
ls -1 "$OUT"

#!/usr/bin/env bash
# Build and install Horovod 0.28.1 for the torch in the active Python, with Gloo, MPI and
# (when torch is a CUDA build and a CUDA toolkit is present) CUDA + NCCL.
#
# Why a source build at all: the 0.28.1 release (the latest) hard-codes C++14, but torch >= 2.1
# needs C++17 and torch 2.14's headers need C++20 (std::strong_ordering). Upstream fixed this on
# master (horovod PR #3998) without a release, so we patch the sdist's CMake files.
#
# The built wheel is cached (keyed by horovod, torch and python versions and the CUDA arch list),
# so a second run, a fresh clone or a new virtualenv on the same machine installs in seconds.
#
# Usage: PYTHON=.venv/bin/python launch/build_horovod.sh      (used by the Makefile and Dockerfile)
# Env:   HVDET_CACHE (default ~/.cache/hvdet), HOROVOD_BUILD_CUDA_CC_LIST (default 80,90: A100/H100),
#        HVDET_HOROVOD_CUDA=0 to build without CUDA even when a toolkit is found,
#        HVDET_HOROVOD_MPI=0 to build without MPI (Gloo only: for an image without OpenMPI's libraries,
#        which a wheel built with MPI links; launch/gpu_wheels.sh builds the lent GPU machine's so).
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python3}
CACHE=${HVDET_CACHE:-$HOME/.cache/hvdet}
die() { echo "build_horovod.sh: error: $*" >&2; exit 1; }

# Already installed and built with PyTorch? Then there is nothing to do.
if "$PYTHON" - <<'PY' 2>/dev/null
import torch, horovod, horovod.torch as hvd
assert horovod.__version__ == "0.28.1"
PY
then
  echo "horovod $HOROVOD_VERSION with PyTorch support already installed"
  exit 0
fi

# --- prerequisites, each with the reason we need it -------------------------------------------
"$PYTHON" -c "import torch" 2>/dev/null || die "torch is not importable by $PYTHON; install torch==2.14.1 first (make venv)"
# System cmake: pip's cmake 4.x rejects gloo's old cmake_minimum_required.
command -v cmake >/dev/null || die "cmake not found; apt-get install cmake"
command -v g++ >/dev/null || die "g++ not found; apt-get install g++"
# MPI controller and Horovod's MPI ops need OpenMPI's headers and mpicxx.
WITH_MPI=${HVDET_HOROVOD_MPI:-1}
[ "$WITH_MPI" = 0 ] || command -v mpicxx >/dev/null || die "mpicxx not found; apt-get install libopenmpi-dev openmpi-bin"

TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__)")
TORCH_CUDA=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
PY_TAG=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
SITE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1
if [ "$WITH_MPI" = 0 ]; then export HOROVOD_WITHOUT_MPI=1; else export HOROVOD_WITH_MPI=1; fi
# One make job per core: the default -j8 thrashes a 2-core machine.
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}

VARIANT=cpu
if [ -n "$TORCH_CUDA" ] && [ "${HVDET_HOROVOD_CUDA:-1}" = 1 ]; then
  # A CUDA build of torch makes Horovod's torch module compile CUDA code whether or not a GPU is
  # present, so the toolkit (nvcc) is required; NCCL comes from the nvidia-nccl wheel torch brings.
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "torch $TORCH_VERSION is a CUDA $TORCH_CUDA build, so Horovod needs a CUDA toolkit: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME, or HVDET_HOROVOD_CUDA=0 with a CPU torch)"
  NCCL_DIR=$(ls -d "$SITE"/nvidia/nccl 2>/dev/null || true)
  [ -f "$NCCL_DIR/include/nccl.h" ] || die "nccl.h not found under $SITE/nvidia/nccl; pip install the nvidia-nccl wheel matching torch"
  # The wheel ships only libnccl.so.2; CMake's find_library wants libnccl.so, so link one in a
  # private folder (never inside site-packages).
  mkdir -p "$CACHE/nccl-lib"
  ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$CACHE/nccl-lib/libnccl.so"
  export CUDA_HOME HOROVOD_CUDA_HOME=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
  export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$CACHE/nccl-lib"
  # Every arch nvcc 13 knows would triple the build time; DGX A100 and H100 are sm_80 and sm_90.
  export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
  VARIANT="cuda${TORCH_CUDA}-sm${HOROVOD_BUILD_CUDA_CC_LIST//,/_}"
else
  export HOROVOD_WITHOUT_GPU=1 HOROVOD_GPU_OPERATIONS=
  unset HOROVOD_GPU_OPERATIONS
fi

[ "$WITH_MPI" = 0 ] && VARIANT="$VARIANT-nompi"
WHEEL_DIR="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PY_TAG-$VARIANT"
if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  echo "building horovod $HOROVOD_VERSION for torch $TORCH_VERSION ($VARIANT); takes about 4-5 min on 2 cores"
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
  tar xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"
  # The C++ standard fix (what horovod PR #3998 does on master):
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 20)/' "$SRC/horovod/torch/CMakeLists.txt"
  sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$SRC/horovod/common/ops/cuda/CMakeLists.txt"
  grep -q "CMAKE_CXX_STANDARD 20" "$SRC/horovod/torch/CMakeLists.txt" || die "patching horovod's CMake files failed (layout changed?)"
  # No build isolation: the extension must compile against the torch installed here.
  "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$SRC"
  mkdir -p "$WHEEL_DIR"
  mv "$WORK"/dist/horovod-*.whl "$WHEEL_DIR"/
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
# horovod's runtime dependencies (cloudpickle, psutil, pyyaml, packaging) without touching torch.
"$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging
"$PYTHON" -c "import horovod.torch as hvd; import horovod; print('horovod', horovod.__version__, 'ok: gloo', hvd.gloo_built(), 'mpi', hvd.mpi_built(), 'nccl', hvd.nccl_built())"

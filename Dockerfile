# hvdet for DGX nodes: CUDA toolkit + the same set-up as a local checkout (`make setup`):
# OpenMPI from the distribution, .venv with the pinned torch 2.14.1 / torchvision 0.29.2, and
# Horovod 0.28.1 built from source by launch/build_horovod.sh with Gloo, MPI, CUDA and NCCL.
#
# One Dockerfile, two GPU generations, chosen by the build argument GPU (docs/docker.md):
#   GPU=hopper (default)  DGX A100 / H100 / H200 (sm_80, sm_90): CUDA 13.0, torch from PyPI (a CUDA 13 build)
#   GPU=v100              DGX-2 (V100, sm_70): CUDA 12.6, torch 2.14.1+cu126 from download.pytorch.org.
#                         CUDA 13 cannot compile for sm_70 and PyTorch's CUDA 13 wheels carry no sm_70
#                         kernels; in PyTorch 2.14 only the cu126 wheels still do.
#
#   docker build -t hvdet .                                  # DGX A100 / H100 / H200
#   docker build --build-arg GPU=v100 -t hvdet:v100 .        # DGX-2
#   docker run --gpus all --ipc=host --network=host hvdet:v100 -np 16 -H localhost:16 python train.py --config configs/largedet_fast_320.yaml
ARG GPU=hopper

FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04 AS base-hopper
# HVDET_TORCH_CUDA empty: `make venv` installs the pinned torch from PyPI as on any checkout.
ENV HOROVOD_BUILD_CUDA_CC_LIST=80,90 \
    HVDET_TORCH_CUDA=

FROM nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04 AS base-v100
ENV HOROVOD_BUILD_CUDA_CC_LIST=70 \
    HVDET_TORCH_CUDA=cu126

# DL3006 (tag the image): base-${GPU} is one of the two stages above, each pinned to a CUDA tag.
# hadolint ignore=DL3006
FROM base-${GPU}

# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev make git ca-certificates openssh-client \
      libopenmpi-dev openmpi-bin cmake g++ \
 && rm -rf /var/lib/apt/lists/*

ENV CUDA_HOME=/usr/local/cuda \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    HVDET_CACHE=/opt/hvdet-cache

WORKDIR /opt/hvdet
# Dependencies first, so code edits do not rebuild torch and Horovod.
COPY setup.py Makefile ./
COPY launch/ launch/
COPY hvdet/__init__.py hvdet/__init__.py
# 1. v100 only: PyTorch's cu126 builds of the pinned versions go into .venv first; `make venv` then
#    finds torch==2.14.1 satisfied by 2.14.1+cu126 (PEP 440 ignores a local label the pin does not
#    name) and keeps them. The two pins must equal setup.py's (tests/test_launchers.py checks).
# 2. Fail before the Horovod build if torch has no kernels for the GPUs this image targets.
# 3. Horovod's CUDA kernels for exactly HOROVOD_BUILD_CUDA_CC_LIST (70, or 80,90).
RUN if [ -n "$HVDET_TORCH_CUDA" ]; then \
      python3 -m venv .venv \
   && .venv/bin/pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/$HVDET_TORCH_CUDA" \
        "torch==2.14.1+$HVDET_TORCH_CUDA" "torchvision==0.29.2+$HVDET_TORCH_CUDA"; \
    fi \
 && make system venv \
 && .venv/bin/python -c "import os, torch; have = torch.cuda.get_arch_list(); want = ['sm_' + c for c in os.environ['HOROVOD_BUILD_CUDA_CC_LIST'].split(',')]; missing = [a for a in want if a not in have]; assert not missing, f'torch {torch.__version__} has no kernels for {missing} (it has {have})'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'kernels', have)" \
 && make horovod \
 && rm -rf /root/.cache/pip

# The rest of `make setup` (the fused optimizer kernel) needs the full source.
COPY . .
RUN make setup && .venv/bin/horovodrun --check-build

ENV PATH=/opt/hvdet/.venv/bin:$PATH
ENTRYPOINT ["horovodrun"]
CMD ["--check-build"]

# hvdet for DGX nodes: CUDA toolkit + the same set-up as a local checkout (`make setup`):
# OpenMPI from the distribution, .venv with the pinned torch 2.14.1 / torchvision 0.29.2, and
# Horovod 0.28.1 built from source by launch/build_horovod.sh with Gloo, MPI, CUDA and NCCL.
#
#   docker build -t hvdet .
#   docker run --gpus all --ipc=host --network=host hvdet -np 16 -H localhost:16 python train.py --config configs/largedet_fast_320.yaml
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev make git ca-certificates openssh-client \
      libopenmpi-dev openmpi-bin cmake g++ \
 && rm -rf /var/lib/apt/lists/*

ENV CUDA_HOME=/usr/local/cuda \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    HVDET_CACHE=/opt/hvdet-cache \
    HOROVOD_BUILD_CUDA_CC_LIST=80,90

WORKDIR /opt/hvdet
# Dependencies first, so code edits do not rebuild torch and Horovod.
COPY setup.py Makefile ./
COPY launch/ launch/
COPY hvdet/__init__.py hvdet/__init__.py
RUN make system venv horovod && rm -rf /root/.cache/pip

# The rest of `make setup` (the fused optimizer kernel) needs the full source.
COPY . .
RUN make setup && .venv/bin/horovodrun --check-build

ENV PATH=/opt/hvdet/.venv/bin:$PATH
ENTRYPOINT ["horovodrun"]
CMD ["--check-build"]

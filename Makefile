# The two commands a new user needs:  make demo   (main job)   and   make test   (tests).
# Each sets itself up first, idempotently: Debian packages, .venv, pinned Python deps, Horovod.
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := $(PY) -m pip
NP    ?= 2
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup system venv horovod kernels test test-fast demo bench chaos gpu-check gpu-wheels gpu-rehearsal lint clean

setup: system venv horovod kernels

# OpenMPI (mpirun, headers for Horovod's MPI ops and mpi4py); sshd and iproute2 for the multi-host tests'
# cluster (launch/testcluster.py); skipped when already there.
system:
	@if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null || ! command -v cmake >/dev/null \
	    || ! test -x /usr/sbin/sshd || ! command -v ip >/dev/null; then \
	  echo "installing libopenmpi-dev openmpi-bin cmake openssh-server iproute2"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin cmake g++ \
	    openssh-server openssh-client iproute2 >/dev/null; \
	fi

# The venv is rebuilt only when setup.py changes (the stamp records that).
venv: .venv/.deps-stamp
.venv/.deps-stamp: setup.py
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -e ".[dev,tensorboard]"
	touch $@

horovod: venv system
	@PYTHON=$(PY) launch/build_horovod.sh

# The fused PMD-LAMB CPU kernel (C++, built once into ~/.cache/torch_extensions), so the first
# optimizer step of a test or a run does not pay the compile.
kernels: venv
	$(PY) -m hvdet.ops.lamb_cpp --build

test: setup
	bash launch/run_tests.sh

# The edit-test loop (under a minute on 2 cores): no set-up step beyond the venv's (a no-op unless setup.py
# changed), no multi-process launches, no multi-second end-to-end tests, no GPU tests (markers in pytest.ini;
# `multirank` is applied by tests/conftest.py). Spread over the cores by pytest-xdist (at most 4 workers:
# each imports torch); its tests are single-process and write only under tmp_path, so they are independent.
test-fast:
	@test -x $(PY) || { echo "test-fast: no .venv here; run 'make setup' (or 'make test') once first"; exit 1; }
	@$(MAKE) --no-print-directory venv
	bash launch/run_tests.sh -m "not multirank and not slow and not gpu" -n auto --maxprocesses 4

demo: setup
	bash launch/demo.sh

# Fault injection on 2-rank runs (stall, kill, preemption, data error, full disk, elastic): prints
# each experiment's figures and writes benchmarks/results/chaos.json. About 3 minutes.
chaos: setup
	$(PY) benchmarks/chaos.py

bench: setup
	$(PY) benchmarks/bn_overhead.py
	$(PY) benchmarks/optimizer_step.py

# The one GPU check (pytest -m gpu + GPU measurements -> benchmarks/results/gpu_check.json). It needs
# no Horovod (one process); without a GPU it says so and runs its CPU-safe parts as a smoke test.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

# For the lent GPU machine, which has no network and its own Python 3.12 / torch 2.11 / triton 3.6: the
# wheels it lacks (Horovod built for that stack, pycocotools, ...) into .whl/, which the device call carries
# (docs/gpu.md). About 12 min the first time (CPython, a torch 2.11 venv and Horovod are built under
# ~/.cache/hvdet), seconds after.
gpu-wheels: system
	bash launch/gpu_wheels.sh

# That stack rehearsed on this CPU: the Triton kernels under triton 3.6's interpreter and its sm_80/sm_90
# compiler, and what the device runs (launch/gpu_check_device.sh) with its Horovod part on CPU tensors.
GPU_VENV := $(or $(HVDET_CACHE),$(HOME)/.cache/hvdet)/venv-gpu-py312
gpu-rehearsal: gpu-wheels
	PYTHONPATH=$(CURDIR) $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_ops.py \
	  tests/test_simulated_ranks.py tests/test_gpu.py
	PATH=$(GPU_VENV)/bin:$$PATH OUT=$$(mktemp -d) bash launch/gpu_check_device.sh --only horovod

lint: venv
	$(PY) -m ruff check hvdet tests benchmarks train.py
	.venv/bin/hadolint Dockerfile

clean:  # keeps runs/ (training runs and their checkpoints) and data/
	rm -rf .venv build *.egg-info

"""The launch/ scripts, the Horovod build and the Dockerfile, exercised for real on localhost."""
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from tests.harness import BIN, ROOT, rank_env, run_command

CHECK = [sys.executable, "launch/allreduce_check.py"]


def _env(**extra):
    env = rank_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _assert_two_ranks_ok(out):
    # mpirun may interleave the ranks' lines, so count the reports rather than lines.
    assert sorted(re.findall(r"rank (\d)/2 .*?allreduce sum 1 \(expected 1\) OK", out)) == ["0", "1"], out


def test_horovodrun_script_on_localhost(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    out = run_command(["bash", "launch/horovodrun.sh", "-f", str(hostfile), "--gloo", "--", *CHECK],
                      timeout_s=300, env=_env())
    _assert_two_ranks_ok(out)
    assert "controller gloo" in out


def test_mpirun_script_on_localhost():
    out = run_command(["bash", "launch/mpirun.sh", "-n", "2", "--", *CHECK], timeout_s=300,
                      env=_env(HVDET_IN_CONTAINER="1"))
    _assert_two_ranks_ok(out)
    assert "controller mpi" in out and "-bind-to none" in out


def test_slurm_script_builds_hostfile_and_launches(tmp_path):
    # No SLURM daemon runs here: a stand-in scontrol answers the one query the script makes;
    # the ranks themselves are started by the real mpirun.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (fake / "scontrol").chmod(stat.S_IRWXU)
    env = _env(PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="t1",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2",
               SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(ROOT), HVDET_IN_CONTAINER="1",
               HVDET_ENTRY="launch/allreduce_check.py")
    out = run_command(["bash", "launch/slurm.sbatch", "configs/none.yaml"], timeout_s=300, env=env)
    _assert_two_ranks_ok(out)
    assert (ROOT / "runs" / "hostfile-t1").read_text() == "localhost slots=2\n"


def test_horovod_build_lists_frameworks_and_controllers():
    out = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True, check=True).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out
    import torch
    if torch.version.cuda:  # a CUDA build of torch makes the build script compile NCCL support
        assert "[X] NCCL" in out, out


def test_build_script_is_idempotent():
    out = subprocess.run(["bash", "launch/build_horovod.sh"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(PYTHON=sys.executable), check=True).stdout
    assert "already installed" in out


def _dockerfile_stages(text):
    """The Dockerfile as (ARGs before the first FROM, [(FROM image, stage alias, [instructions])])."""
    lines, buf = [], ""
    for raw in text.splitlines():
        raw = raw.strip()
        if raw.startswith("#"):  # comments (and hadolint pragmas), also inside a continued instruction
            continue
        if raw.endswith("\\"):
            buf += raw[:-1] + " "
            continue
        if (buf + raw).strip():
            lines.append((buf + raw).strip())
        buf = ""
    global_args, stages = [], []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            image, _, alias = rest.partition(" AS ")
            stages.append((image.strip(), alias.strip(), []))
        elif stages:
            stages[-1][2].append(line)
        elif word.upper() == "ARG":
            global_args.append(rest.strip())
    return global_args, stages


def _env_of(instructions):
    env = {}
    for line in instructions:
        if line.upper().startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S*)", line[4:]))
    return env


def test_dockerfile_lints_clean_and_builds_for_both_gpu_generations():
    hadolint = BIN / "hadolint"
    subprocess.run([str(hadolint), "Dockerfile"], cwd=ROOT, check=True)
    docker = (ROOT / "Dockerfile").read_text()
    global_args, stages = _dockerfile_stages(docker)
    by_alias = {alias: (image, body) for image, alias, body in stages}

    # The build argument GPU picks the base stage; the default is the A100/H100/H200 image.
    assert "GPU=hopper" in global_args, global_args
    assert stages[-1][0] == "base-${GPU}", stages[-1][0]
    assert set(by_alias) >= {"base-hopper", "base-v100"}, list(by_alias)

    def cuda_tag(alias):
        m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu[\d.]+", by_alias[alias][0])
        assert m, by_alias[alias][0]
        return int(m.group(1)), int(m.group(2))

    hopper, v100 = _env_of(by_alias["base-hopper"][1]), _env_of(by_alias["base-v100"][1])
    # DGX A100/H100/H200: CUDA 13 toolkit, torch from PyPI (no index override), kernels for sm_80 + sm_90.
    assert cuda_tag("base-hopper")[0] == 13
    assert hopper["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90" and hopper["HVDET_TORCH_CUDA"] == ""
    # DGX-2 (V100): CUDA 13 has no sm_70, so a CUDA 12 toolkit, sm_70 kernels, and the PyTorch wheels
    # built for the same CUDA release as the toolkit (cu126 is PyTorch 2.14's only build with sm_70).
    major, minor = cuda_tag("base-v100")
    assert major == 12
    assert v100["HOROVOD_BUILD_CUDA_CC_LIST"] == "70"
    assert v100["HVDET_TORCH_CUDA"] == f"cu{major}{minor}" == "cu126"

    # The v100 pre-install names exactly setup.py's pins (plus the +cu126 label), so `make venv`
    # finds them satisfied instead of pulling the PyPI (CUDA 13) builds over them.
    setup_pins = dict(re.findall(r'"(torch|torchvision)==([\d.]+)"', (ROOT / "setup.py").read_text()))
    docker_pins = dict(re.findall(r'"(torch|torchvision)==([\d.]+)\+\$HVDET_TORCH_CUDA"', docker))
    assert setup_pins and docker_pins == setup_pins, (docker_pins, setup_pins)
    assert 'https://download.pytorch.org/whl/$HVDET_TORCH_CUDA' in docker

    # Same install steps as a local checkout: `make venv`, then `make horovod` (the build script, which
    # must take the image's arch list rather than its own default), then `make setup`.
    assert re.search(r"make system venv .*torch\.cuda\.get_arch_list\(\).*make horovod", docker, re.DOTALL)
    assert "RUN make setup" in docker and 'ENTRYPOINT ["horovodrun"]' in docker
    assert "launch/build_horovod.sh" in (ROOT / "Makefile").read_text()
    assert "HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-" in (ROOT / "launch/build_horovod.sh").read_text()
    # The host's .venv (a different torch build) must never be copied over the image's.
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_gpu_check_without_a_gpu_says_so_and_runs_its_cpu_parts(tmp_path):
    """`make gpu-check` on a machine without CUDA: it says so, measures nothing, and its code paths
    (LAMB implementations agreeing, CGBN's group path == BatchNorm2d) still run as a smoke test."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: benchmarks/gpu_check.py measures instead (pytest -m gpu)")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)], cwd=ROOT,
                          env=rank_env(threads=1), capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU found" in proc.stdout and "CPU smoke test passed" in proc.stdout
    assert not out.exists()  # nothing measured, nothing written

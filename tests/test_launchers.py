"""The launch/ scripts, the Horovod build and the Dockerfile, exercised for real on localhost."""
import os
import re
import stat
import subprocess
import sys

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


def test_dockerfile_lints_clean_and_uses_the_local_setup():
    hadolint = BIN / "hadolint"
    subprocess.run([str(hadolint), "Dockerfile"], cwd=ROOT, check=True)
    docker = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    # Same install steps as a local checkout: the image runs `make setup`, which runs the build script.
    assert "RUN make system venv horovod" in docker and "RUN make setup" in docker
    assert "launch/build_horovod.sh" in makefile
    assert 'ENTRYPOINT ["horovodrun"]' in docker

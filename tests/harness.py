"""Run a function on N ranks under a real launcher and collect each rank's result.

    results = run_ranks("tests.test_comm:case_allreduce", np=2, launcher="horovodrun", n=3)

``launcher`` is one of ``horovodrun`` (Gloo controller), ``horovodrun-mpi``, ``mpirun`` or ``torchrun``
(``comm.gradients: ddp``: torch.distributed's world, gradients by DistributedDataParallel). The
function runs after ``hvdet.comm.init()`` and must return something picklable. A launch that
fails, hangs past ``timeout_s`` or loses a rank raises :class:`LaunchError` with every rank's
output: a distributed test never skips silently.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LAUNCHERS = ("horovodrun", "horovodrun-mpi", "mpirun", "torchrun")
# OpenMPI inside containers: no CMA single-copy (ptrace is usually denied), no InfiniBand probing.
MPIRUN_FLAGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                "--mca", "btl_vader_single_copy_mechanism", "none", "--mca", "btl", "^openib"]
# False while pytest runs a test without the `multirank` marker (tests/conftest.py), so that a launch the
# marker scan missed fails loudly instead of making `make test-fast` slow. True outside pytest.
LAUNCH_ALLOWED = True


class LaunchError(RuntimeError):
    pass


def rank_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    # hvdet.comm.init() run in this process (in-process tests) chose defaults for it, not for the
    # ranks launched now: leave them out (the ranks choose theirs), unless a test has changed them.
    from hvdet.comm.horovod_env import applied_defaults
    for key, value in applied_defaults().items():
        if env.get(key) == value:
            del env[key]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # N ranks share 2 cores: one thread each, or they fight over them.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", CUDA_VISIBLE_DEVICES="")
    return env


def launch_command(np: int, launcher: str, program: list[str], hosts: str | None = None) -> list[str]:
    """The command line that starts ``program`` (argv after 'python') on ``np`` ranks: local ones, or
    on ``hosts`` ("h1:2,h2:2", tests/cluster.py's test cluster; not for torchrun)."""
    python = sys.executable
    where = hosts or f"localhost:{np}"
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", where, "--gloo", python, *program]
    if launcher == "horovodrun-mpi":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", where, "--mpi",
                # horovodrun sets btl and run-as-root itself; a repeated MCA param is an error.
                "--mpi-args=--oversubscribe --mca btl_vader_single_copy_mechanism none", python, *program]
    if launcher == "torchrun":  # one host; a free rendezvous port of its own (--standalone)
        return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={np}", *program]
    if launcher == "mpirun":
        exported = [a for k in ("PYTHONPATH", "OMP_NUM_THREADS", "PATH") for a in ("-x", k)]
        placed = ["--host", hosts] if hosts else []
        return [shutil.which("mpirun") or "mpirun", "-np", str(np), *MPIRUN_FLAGS, *placed, *exported, python, *program]
    raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")


def run_command(cmd: list[str], timeout_s: float, env: dict | None = None, cwd: Path = ROOT) -> str:
    """Run a launcher command; on failure or time-out raise LaunchError with its output."""
    if not LAUNCH_ALLOWED:
        raise LaunchError("this test launches processes but is not marked `multirank`, so it would run in "
                          "`make test-fast`: mark it (pytest.mark.multirank) or call the launch helpers where "
                          f"tests/conftest.py's scan finds them: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher tree, so no rank outlives the test
        out, _ = proc.communicate()
        raise LaunchError(f"timed out after {timeout_s}s (a rank hung?): {' '.join(cmd)}\n{out}") from None
    if proc.returncode != 0:
        raise LaunchError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{out}")
    return out


def run_ranks(target: str, np: int = 2, launcher: str = "horovodrun", timeout_s: float = 600,
              threads: int = 1, hosts: str | None = None, **kwargs) -> list:
    """Run ``target`` ('module:function') on ``np`` ranks; return the results in rank order.
    ``hosts``: on the test cluster's hosts ("hvdet-h1:2,hvdet-h2:2"), launched from the first one."""
    with tempfile.TemporaryDirectory(prefix="hvdet-ranks-") as out_dir:
        with open(os.path.join(out_dir, "kwargs.pkl"), "wb") as f:
            pickle.dump(kwargs, f)
        cmd = launch_command(np, launcher, ["-m", "tests._rank_worker", target, out_dir], hosts)
        if hosts:
            from tests.cluster import launch_on

            cmd = launch_on(cmd, env=rank_env(threads))
        try:
            out = run_command(cmd, timeout_s, rank_env(threads))
        except LaunchError as err:
            raise LaunchError(f"{err}\n{_rank_errors(out_dir, np)}") from None
        results = []
        for r in range(np):
            path = Path(out_dir, f"rank{r}.pkl")
            if not path.exists():
                raise LaunchError(f"rank {r} wrote no result; launcher output:\n{out}")
            ok, value = pickle.loads(path.read_bytes())
            if not ok:
                raise LaunchError(f"rank {r} raised:\n{value}")
            results.append(value)
        return results


def _rank_errors(out_dir: str, np: int) -> str:
    lines = []
    for r in range(np):
        path = Path(out_dir, f"rank{r}.pkl")
        if path.exists():
            ok, value = pickle.loads(path.read_bytes())
            if not ok:
                lines.append(f"--- rank {r} raised:\n{value}")
    return "\n".join(lines)

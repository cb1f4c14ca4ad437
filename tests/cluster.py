"""Launches across the hosts of launch/testcluster.py (network namespaces with sshd on this machine).

A launcher runs where a user runs it on a cluster: logged in on the first host (``ssh hvdet-h1``),
in the checkout that every host sees at the same path, starting ranks on the others over ssh.

    with_cluster(3)                                       # up (idempotent); None, or why it cannot
    cmd = launch_on(["horovodrun", "-np", "4", "-H", hosts_arg({1: 2, 2: 2}), ...])
    run_command(cmd, timeout_s=300)                       # tests.harness: output, or LaunchError
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tests.harness import BIN, ROOT, rank_env

SCRIPT = [sys.executable, str(ROOT / "launch" / "testcluster.py")]
# What a launcher on the first host needs from the test's environment (ssh starts a fresh one).
FORWARD = ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONUNBUFFERED", "PYTHONFAULTHANDLER",
           "CUDA_VISIBLE_DEVICES", "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "TRITON_INTERPRET")


def host(i: int) -> str:
    return f"hvdet-h{i}"


def hosts_arg(slots: dict[int, int]) -> str:
    """{1: 2, 2: 2} -> 'hvdet-h1:2,hvdet-h2:2' (horovodrun's -H)."""
    return ",".join(f"{host(i)}:{n}" for i, n in slots.items())


def hostfile(path: Path, slots: dict[int, int]) -> Path:
    path.write_text("".join(f"{host(i)} slots={n}\n" for i, n in slots.items()))
    return path


def cluster(*args: str, check: bool = True) -> str:
    """launch/testcluster.py with ``args``; its stdout (a failure raises with its message)."""
    proc = subprocess.run([*SCRIPT, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode:
        raise RuntimeError(f"testcluster {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def unavailable() -> str | None:
    """Why this machine cannot make the cluster (not root, no network namespaces), else None. A
    missing sshd is not a reason: `make setup` installs it, so its absence fails the tests."""
    if os.geteuid() != 0:
        return "the test cluster needs root (network namespaces)"
    probe = subprocess.run(["ip", "netns", "add", "hvdet-probe"], capture_output=True, text=True, check=False)
    if probe.returncode:
        return f"no network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "hvdet-probe"], capture_output=True, check=False)
    return None


def launch_on(cmd: list[str], on: int = 1, env: dict | None = None, cwd: Path = ROOT) -> list[str]:
    """``cmd`` as run on host ``on`` over ssh, in ``cwd``, with the test's rank environment."""
    env = env or rank_env()
    env = ({k: env[k] for k in FORWARD if k in env}
           | {k: v for k, v in env.items() if k.startswith(("HVDET_", "HOROVOD_", "SLURM_"))})
    env["PATH"] = f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    remote = f"cd {shlex.quote(str(cwd))} && exec env {exports} {shlex.join(cmd)}"
    return ["ssh", "-o", "BatchMode=yes", host(on), remote]


def on_host(i: int, command: str, timeout_s: float = 30) -> str:
    """A shell command's output on host ``i`` (its own /dev/shm, hostname, processes)."""
    return subprocess.run(["ssh", "-o", "BatchMode=yes", host(i), command], capture_output=True, text=True,
                          timeout=timeout_s, check=True).stdout

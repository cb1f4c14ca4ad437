"""Multi-host runs: the launchers across the hosts of launch/testcluster.py (network namespaces on this
machine, each with its own hostname, /dev/shm and sshd; the checkout shared as on a cluster).

Launched from the first host as a user would: ``horovodrun -H hvdet-h1:2,hvdet-h2:2`` with the Gloo and
the MPI controller, ``launch/mpirun.sh -f HOSTFILE`` and ``launch/slurm.sbatch`` (stand-in ``scontrol``
naming the hosts). The oracle for the training runs is the same run with all ranks on localhost: the
losses must agree at every iteration (they come out bit for bit: Cross-GPU BN gathers every rank's
statistics and combines them in rank order, whichever backend carries them). Faults: a host's link
cut, a host's ranks killed, Horovod elastic losing one host and gaining another.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import cluster as cl
from tests.harness import BIN, ROOT, launch_command, rank_env, run_command, run_ranks
from tests.test_train import RECIPE, tiny_overrides

pytestmark = [pytest.mark.multirank, pytest.mark.cluster]

LAYOUT = {1: 2, 2: 2}  # host index -> ranks
TIMEOUT_S = 600        # only to kill a hung launch
STALL_S = 10           # comm.timeout_s of the fault runs


@pytest.fixture(scope="module")
def hosts():
    why = cl.unavailable()
    if why:
        pytest.skip(why)
    cl.cluster("up", "--hosts", "3")
    yield
    cl.cluster("down")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
    assert not any(n.startswith("hvdet-h") for n in left), left


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, image_size=64)


def env() -> dict:
    """The ranks' environment, with Horovod's tensor fusion off: which gradients share a fused buffer
    depends on when backward produced them, and a tensor's offset in the buffer decides which rank
    starts the ring's sum for its elements, so with more than 2 ranks fused runs differ in the last bits
    from run to run, on one host too (and PMD-LAMB's normalized step makes those bits visible at 1e-5).
    Unfused, every tensor is summed in the same order on any layout: the runs compare bit for bit."""
    return dict(rank_env(), HOROVOD_FUSION_THRESHOLD="0")


def train_args(data, out, group: int, iterations: int = 4, **extra) -> list[str]:
    """The demo recipe shrunk (tests/test_train.py), a record per iteration, BN groups of ``group`` ranks."""
    keys = {"log.interval": 1, "bn.size_images": 2 * group, "eval.at_end": "false", **extra}
    return [*tiny_overrides(data, out, iterations), *(f"{k}={v}" for k, v in keys.items())]


def records(out: Path, kind: str) -> list[dict]:
    """metrics.jsonl's records of ``kind`` (read while the run writes it too: a partial last line is skipped)."""
    path = out / "metrics.jsonl"
    lines = [x for x in path.read_text().splitlines() if x.endswith("}")] if path.exists() else []
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# -- which backend a BN group takes -------------------------------------------------------------------

def case_group_backends():
    import socket

    from hvdet import comm
    from hvdet.comm import groups

    x = torch.tensor([float(comm.rank())], dtype=torch.float64)
    found = {}
    for size in (2, 4):
        group = groups.consecutive_groups(size)
        found[size] = (group.resolve_backend(torch.device("cpu"), "auto", 257), group.allreduce(x).item())
    return socket.gethostname(), found


@pytest.mark.parametrize("launcher, across", [("horovodrun", "torch"), ("mpirun", "mpi")])
def test_bn_groups_use_shared_memory_inside_a_host_and_the_network_across(hosts, launcher, across):
    results = run_ranks("tests.test_cluster:case_group_backends", np=4, launcher=launcher,
                        hosts=cl.hosts_arg(LAYOUT), timeout_s=TIMEOUT_S)
    assert [host for host, _ in results] == [cl.host(1)] * 2 + [cl.host(2)] * 2
    for rank, (_, found) in enumerate(results):
        assert found[2] == ("shm", 1.0 if rank < 2 else 5.0), (rank, found)  # ranks {0,1} and {2,3}, one host each
        assert found[4] == (across, 6.0), (rank, found)                      # all four, across the link


# -- training across hosts = training on localhost -------------------------------------------------------

def launch_training(launcher: str, args: list[str], tmp_path: Path, slots: dict[int, int] = LAYOUT) -> str:
    """train.py on ``slots`` through ``launcher``, started on the first host; its output."""
    np, env_ = sum(slots.values()), env()
    program = ["train.py", "--config", RECIPE, *args]
    cwd = ROOT
    if launcher in ("horovodrun", "horovodrun-mpi"):
        cmd = launch_command(np, launcher, program, cl.hosts_arg(slots))
    elif launcher == "mpirun.sh":
        cmd = ["bash", "launch/mpirun.sh", "-f", str(cl.hostfile(tmp_path / "hostfile", slots)), "-n", str(np),
               "--", sys.executable, *program]
        env_["HVDET_IN_CONTAINER"] = "1"
    elif launcher == "slurm":
        cmd, env_, cwd = slurm_job(tmp_path, slots, args, env_)
    else:
        raise ValueError(launcher)
    return run_command(cl.launch_on(cmd, env=env_, cwd=cwd), TIMEOUT_S, env_)


def slurm_job(tmp_path: Path, slots: dict[int, int], args: list[str], env: dict):
    """launch/slurm.sbatch as SLURM would start it on the first node of an allocation of these hosts:
    its environment, and a stand-in ``scontrol`` that expands the node list (no SLURM daemon here)."""
    fake, submit = tmp_path / "bin", tmp_path / "submit"
    fake.mkdir()
    submit.mkdir()
    names = "\n".join(cl.host(i) for i in slots)
    (fake / "scontrol").write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf '%s\\n' '{names}'\n")
    (fake / "scontrol").chmod(stat.S_IRWXU)
    for name in ("launch", ".venv", "train.py", "configs"):
        (submit / name).symlink_to(ROOT / name)
    per_node = set(slots.values())
    assert len(per_node) == 1, "SLURM's --ntasks-per-node is one number"
    env = dict(env, HVDET_IN_CONTAINER="1", SLURM_JOB_ID="c1", SLURM_JOB_NODELIST=f"hvdet-h[1-{len(slots)}]",
               SLURM_JOB_NUM_NODES=str(len(slots)), SLURM_NTASKS_PER_NODE=str(per_node.pop()),
               SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(submit), HVDET_PATH_FIRST=str(fake))
    return ["bash", "-c", 'PATH="$HVDET_PATH_FIRST:$PATH" exec bash launch/slurm.sbatch "$@"', "sbatch",
            RECIPE, *args], env, submit


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run with all 4 ranks on localhost, per controller (Gloo's ring and MPI's allreduce sum
    in different orders) and BN group size; made when first asked for."""
    made = {}

    def get(controller: str, group: int) -> Path:
        if (controller, group) not in made:
            out = tmp_path_factory.mktemp(f"localhost-{controller}-g{group}")
            launcher = "horovodrun" if controller == "gloo" else "mpirun"
            run_command(launch_command(4, launcher, ["train.py", "--config", RECIPE, *train_args(data, out, group)]),
                        TIMEOUT_S, env())
            made[controller, group] = out
        return made[controller, group]

    return get


# Both group sizes under horovodrun's Gloo controller; the others where their paths differ: horovodrun's
# MPI controller and the SLURM job across hosts (mpi4py groups), mpirun.sh inside a host (shared memory).
@pytest.mark.parametrize("launcher, group", [("horovodrun", 2), ("horovodrun", 4), ("horovodrun-mpi", 4),
                                             ("mpirun.sh", 2), ("slurm", 4)])
def test_training_across_hosts_logs_the_localhost_losses(hosts, data, reference, launcher, group, tmp_path):
    out = tmp_path / "run"
    log = launch_training(launcher, train_args(data, out, group), tmp_path)
    assert f"4 ranks on 2 hosts: {cl.host(1)} (ranks 0-1), {cl.host(2)} (ranks 2-3)" in log, log[-3000:]
    ref_dir = reference("gloo" if launcher == "horovodrun" else "mpi", group)
    ref, mine = records(ref_dir, "train"), records(out, "train")
    assert [r["iteration"] for r in mine] == [1, 2, 3, 4]  # rank 0 alone writes: one record per iteration
    worst = max(abs(a["losses"][k] - b["losses"][k]) / abs(b["losses"][k])
                for a, b in zip(mine, ref, strict=True) for k in b["losses"])
    print(f"{launcher}, BN groups of {group}: largest relative loss difference to localhost {worst:.3g}")
    # The logged loss is averaged over the world's group: shared memory on localhost, the network
    # here, summed in another order: equal to the last bits. The weights must be equal outright.
    assert worst <= 1e-6
    assert records(out, "hosts") == [{"type": "hosts", "iteration": 0, "world_size": 4,
                                      "hosts": {cl.host(1): [0, 1], cl.host(2): [2, 3]}}]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["iterations"], summary["stop"]) == (4, 4, "max_iters")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000002.pt", "iter_0000004.pt", "last.pt"]
    a, b = weights(out / "checkpoints" / "iter_0000004.pt"), weights(ref_dir / "checkpoints" / "iter_0000004.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not (out / "errors").exists() and not list(out.rglob(".*.tmp"))


def test_resume_on_another_host_layout_equals_uninterrupted(hosts, data, reference, tmp_path):
    """Checkpointed on localhost with shared-memory BN groups, continued on three hosts whose first BN
    group spans two of them (so every group takes the network): the same weights at iteration 4."""
    ref = reference("gloo", 2)
    out = tmp_path / "run"
    slots = {1: 1, 2: 1, 3: 2}
    log = launch_training("horovodrun",
                          [*train_args(data, out, 2), "--resume", str(ref / "checkpoints" / "iter_0000002.pt")],
                          tmp_path, slots)
    assert f"4 ranks on 3 hosts: {cl.host(1)} (ranks 0), {cl.host(2)} (ranks 1), {cl.host(3)} (ranks 2-3)" in log
    a, b = weights(ref / "checkpoints" / "iter_0000004.pt"), weights(out / "checkpoints" / "iter_0000004.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["iteration"] for r in records(out, "train")] == [3, 4]


# -- faults across hosts ------------------------------------------------------------------------------

class Background:
    """A launch script started on the first host, in the background; the run's progress read from its files."""

    def __init__(self, cmd: list[str], out: Path, env: dict, log: Path):
        self.out, self.log = out, log
        self._file = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cl.launch_on(cmd, env=env), env=env, stdout=self._file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def iteration(self) -> int:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max((json.loads(x).get("iteration", 0) for x in lines if x.endswith("}")), default=0)

    def wait_for(self, iteration: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.iteration() < iteration:
            assert self.proc.poll() is None, f"ended before iteration {iteration}: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no iteration {iteration} in {timeout_s} s"
            time.sleep(0.1)

    def wait_for_record(self, kind: str, match, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(match(r) for r in records(self.out, kind)):
            assert self.proc.poll() is None, f"ended before a {kind} record: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no such {kind} record in {timeout_s} s"
            time.sleep(0.5)

    def wait(self, timeout_s: float) -> tuple[int | None, str]:
        if self._file.closed:
            return self.proc.returncode, self.log.read_text()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            code = None
        self._file.close()
        return code, self.log.read_text()


def rank_processes(i: int) -> list[str]:
    """train.py processes in host ``i``'s network namespace (the hosts share one PID namespace, so
    ``ps`` on a host would list every host's)."""
    pids = subprocess.run(["ip", "netns", "pids", cl.host(i)], capture_output=True, text=True,
                          check=False).stdout.split()
    found = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "train.py" in args:
            found.append(f"{pid} {args}")
    return found


def segments(i: int) -> list[str]:
    return cl.on_host(i, "ls /dev/shm").split()


def wait_gone(i: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := rank_processes(i)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def horovodrun_script(tmp_path: Path, args: list[str], slots: dict[int, int] = LAYOUT) -> list[str]:
    return ["bash", "launch/horovodrun.sh", "-f", str(cl.hostfile(tmp_path / "hostfile", slots)), "--gloo", "--",
            sys.executable, "train.py", "--config", RECIPE, *args]


def test_a_cut_link_ends_the_job_within_the_timeout_naming_the_host(hosts, data, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, 4, iterations=500, **{"comm.timeout_s": STALL_S, "checkpoint.interval": 0})
    job = Background(horovodrun_script(tmp_path, args), out, env(), tmp_path / "launch.log")
    try:
        job.wait_for(2)
        cl.cluster("cut", "2")
        t0 = time.monotonic()
        code, log = job.wait(STALL_S + 120)
        seconds = time.monotonic() - t0
    finally:
        cl.cluster("heal", "2")
    print(f"link cut: launcher exit {code} after {seconds:.1f} s (comm.timeout_s={STALL_S})")
    assert code == 3, log[-3000:]  # stalled, as on one host
    lines = [line for line in log.splitlines() if "hvdet: rank" in line]
    assert any(f"unreachable from {cl.host(1)}: {cl.host(2)}" in line for line in lines), lines
    assert any(f"rank 2 on {cl.host(2)}" in line for line in lines), lines
    assert seconds < STALL_S + 60, seconds
    # The cut host's ranks could not hear the launcher: their own watchdogs end them.
    assert wait_gone(2, STALL_S + 30) == [] and rank_processes(1) == []
    assert segments(1) == [] and segments(2) == []


def test_a_hosts_killed_ranks_are_named_and_nothing_is_left(hosts, data, tmp_path):
    out = tmp_path / "run"
    args = train_args(data, out, 4, iterations=500, **{"comm.timeout_s": 60, "checkpoint.interval": 2})
    job = Background(horovodrun_script(tmp_path, args), out, env(), tmp_path / "launch.log")
    job.wait_for(3)
    cl.cluster("kill", "2", "--match", "train.py")
    t0 = time.monotonic()
    code, log = job.wait(180)
    seconds = time.monotonic() - t0
    print(f"ranks on {cl.host(2)} killed: launcher exit {code} after {seconds:.1f} s")
    assert code == 1, log[-3000:]  # failed, as when a rank dies on one host
    assert "was killed (its process ended without a word" in log and f"on {cl.host(2)}" in log, log[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("iter_*.pt"))
    assert checkpoints and job.iteration() - int(checkpoints[-1].stem[5:]) < 2  # lost: since the last checkpoint
    assert wait_gone(1, 30) == [] and wait_gone(2, 30) == []
    assert segments(1) == [] and segments(2) == []


def test_elastic_training_loses_a_host_and_uses_one_added(hosts, data, tmp_path):
    """Horovod elastic over launch/discover_hosts.sh: the host list loses hvdet-h2 mid-run (its rank is
    stopped; the job continues on hvdet-h1 from the last commit), then gains hvdet-h3 (a rank starts
    there, takes the commit in the state sync, and the world grows again). Not with env()'s fusion
    threshold 0: Horovod's re-init at an elastic reset crashes with it (docs/cluster.md)."""
    iterations = 400  # 3-10 a second: time for a rank to start on the added host (~20 s) before the end
    out, hosts_file = tmp_path / "run", tmp_path / "hosts.elastic"
    hosts_file.write_text(f"{cl.host(1)}:1\n{cl.host(2)}:1\n")
    args = train_args(data, out, 2, iterations=iterations, **{"elastic.enabled": "true", "elastic.commit_interval": 2,
                                                       "comm.timeout_s": 60, "checkpoint.interval": 0})
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
           str(ROOT / "launch" / "discover_hosts.sh"), sys.executable, "train.py", "--config", RECIPE, *args]
    job = Background(cmd, out, dict(rank_env(), HVDET_HOSTS_FILE=str(hosts_file)), tmp_path / "launch.log")
    try:
        job.wait_for(4)
        hosts_file.write_text(f"{cl.host(1)}:1\n")
        job.wait_for_record("world", lambda r: r["world_size"] == 1)
        hosts_file.write_text(f"{cl.host(1)}:1\n{cl.host(3)}:1\n")
        job.wait_for_record("world", lambda r: r["world_size"] == 2)
        code, log = job.wait(600)
    finally:
        job.wait(0)
    assert code == 0, log[-3000:]
    # Where the ranks were: logged where the ranks of a world meet (the start, and the state sync after
    # a host joined; a removal continues without a sync, its world record says who is left).
    layouts = [(r["iteration"], r["world_size"], r["hosts"]) for r in records(out, "hosts")]
    print("layouts:", layouts)
    assert sorted(layouts[0][2]) == [cl.host(1), cl.host(2)] and layouts[0][1] == 2, layouts  # Horovod orders hosts
    assert layouts[-1][2] == {cl.host(1): [0], cl.host(3): [1]}, layouts  # the survivor stays rank 0
    worlds = [(r["iteration"], r["previous_world_size"], r["world_size"]) for r in records(out, "world")]
    assert [w[1:] for w in worlds] == [(2, 1), (1, 2)], worlds  # each change once (loaded by reset and sync)
    train_its = [r["iteration"] for r in records(out, "train")]
    assert train_its == sorted(set(train_its)) and train_its[-1] == iterations  # redone iterations replaced, none twice
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop"] == "max_iters" and summary["world_size"] == 2
    assert wait_gone(2, 30) == [] and wait_gone(3, 30) == [] and wait_gone(1, 30) == []

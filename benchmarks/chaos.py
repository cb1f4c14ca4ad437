"""Fault injection: what a cluster does to a run, done to a 2-rank training run on this machine.

    python benchmarks/chaos.py [--only NAME ...] [--out benchmarks/results/chaos.json]   (= make chaos)

Each experiment starts ``train.py`` (the demo recipe, shrunk to 64-px images) on 2 ranks through
``launch/horovodrun.sh`` or ``launch/mpirun.sh``, injects one fault, and reports: seconds from the
fault to the end of every process, the exit code the launch script returned, the message that names
the cause, iterations of work lost, ``/dev/shm`` segments and checkpoint temp files left behind, and,
where the run can continue, whether ``--resume`` ends with exactly the weights of an uninterrupted run.

=================  ===========================================================================
stall-<launcher>   SIGSTOP rank 1 for longer than ``comm.timeout_s`` (10 s here)
kill-<launcher>    SIGKILL rank 1 mid-run, then resume from the last checkpoint
preempt-<launcher> SIGTERM to the launch script mid-run (SLURM's preemption), then resume
data-rank1         rank 1's first images are truncated: it fails before the BN segment is shared
disk-full          the run directory is a 1 MiB tmpfs (root only): the first checkpoint cannot fit
elastic-kill       Horovod elastic on 3 ranks ("localhost:2" and "127.0.0.1:1", one host to Horovod
                   each), SIGKILL the rank on the second: the job goes on with 2, no restart
=================  ===========================================================================

tests/test_faults.py runs the same functions with assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import itertools

from benchmarks.provenance import ROOT, provenance

RECIPE = "configs/synthetic_demo.yaml"
TIMEOUT_S = 10  # comm.timeout_s of the stall experiments


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
             OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    e.pop("HVDET_EXIT_FILE", None)
    return e


def make_data(folder: Path) -> dict:
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(folder, num_train=16, num_val=4, image_size=64)


def overrides(data: dict, out: Path, iterations: int, **extra) -> list[str]:
    root = Path(data["train_ann"]).parent.parent
    keys = {"data.root": root, "data.images_per_gpu": 2, "data.num_workers": 0, "data.min_sizes": "[64]",
            "data.max_size": 64, "solver.max_iters": iterations, "solver.steps": "[]", "solver.warmup_iters": 1,
            "eval.interval": 0, "eval.at_end": "false", "log.interval": 1, "log.progress": "false",
            "checkpoint.interval": 0, "output_dir": out, **extra}
    return [f"{k}={v}" for k, v in keys.items()]


def command(launcher: str, args: list[str], workdir: Path) -> list[str]:
    program = [sys.executable, "train.py", "--config", RECIPE, *args]
    if launcher == "horovodrun":
        hostfile = workdir / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        return ["bash", "launch/horovodrun.sh", "-f", str(hostfile), "-n", "2", "--gloo", "--", *program]
    return ["bash", "launch/mpirun.sh", "-n", "2", "--", *program]


class Launch:
    """A training launch in the background, its ranks found by their environment."""

    def __init__(self, launcher: str, args: list[str], workdir: Path):
        self.log = workdir / f"launch-{time.monotonic_ns()}.log"
        self._file = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(command(launcher, args, workdir), cwd=ROOT, env=env(), stdout=self._file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def ranks(self) -> dict[int, psutil.Process]:
        found = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "train.py" not in " ".join(p.cmdline()):
                    continue
                e = p.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rank = e.get("HOROVOD_RANK", e.get("OMPI_COMM_WORLD_RANK"))
            if rank is not None and p.name().startswith("python"):
                found[int(rank)] = p
        return found

    def wait(self, timeout_s: float) -> tuple[int | None, str]:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = None
        self._file.close()
        return code, self.log.read_text()

    def signal_launcher(self, sig: int) -> None:
        self.proc.send_signal(sig)


def wait_for_iteration(out: Path, iteration: int, launch: Launch, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if logged_iteration(out) >= iteration and len(launch.ranks()) == 2:
            return
        if launch.proc.poll() is not None:
            raise RuntimeError(f"the run ended before iteration {iteration}: {launch.log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no iteration {iteration} within {timeout_s} s")


def logged_iteration(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    its = [json.loads(line).get("iteration", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(its, default=0)


def segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("hvdet-*")} if Path("/dev/shm").is_dir() else set()


def temp_files(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob(".*.tmp")]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _running(pids) -> bool:
    def alive(p):
        try:
            return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return any(alive(p) for p in pids)


def _gone(pids, deadline_s: float) -> float | None:
    """Seconds until every process in ``pids`` has ended (None: some still alive at the deadline)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if not _running(pids):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------------------------------------
# Experiments: each returns a flat dict of figures
# ---------------------------------------------------------------------------------------------

def stall(launcher: str, data: dict, workdir: Path) -> dict:
    out, before = workdir / f"stall-{launcher}", segments()
    launch = Launch(launcher, overrides(data, out, 500, **{"comm.timeout_s": TIMEOUT_S}), workdir)
    wait_for_iteration(out, 2, launch)
    ranks = launch.ranks()
    pids = [p.pid for p in ranks.values()]
    ranks[1].suspend()
    t0, ranks_gone_s = time.monotonic(), None
    while launch.proc.poll() is None and time.monotonic() - t0 < TIMEOUT_S + 60:
        if ranks_gone_s is None and not _running(pids):
            ranks_gone_s = time.monotonic() - t0
        time.sleep(0.05)
    code, log = launch.wait(5)
    exit_s = time.monotonic() - t0
    if ranks_gone_s is None:
        later = _gone(pids, 30)
        ranks_gone_s = None if later is None else exit_s + later
    for p in pids:  # a process left stopped must not outlive the experiment
        if psutil.pid_exists(p):
            psutil.Process(p).kill()
    return {"fault": f"SIGSTOP rank 1 (comm.timeout_s={TIMEOUT_S})", "launcher_exit_code": code,
            "seconds_to_exit": round(exit_s, 1),
            "ranks_gone_s": None if ranks_gone_s is None else round(ranks_gone_s, 1),
            "names_rank_1": _names_rank(log, 1), "message": _hvdet_lines(log),
            "leaked_segments": len(segments() - before), "temp_files": temp_files(out)}


def kill(launcher: str, data: dict, workdir: Path, reference: Path) -> dict:
    out, before = workdir / f"kill-{launcher}", segments()
    args = overrides(data, out, 8, **{"checkpoint.interval": 2})
    launch = Launch(launcher, args, workdir)
    wait_for_iteration(out, 5, launch)
    launch.ranks()[1].kill()
    t0 = time.monotonic()
    code, _log = launch.wait(120)
    lost = logged_iteration(out) - _last_checkpoint(out)
    result = {"fault": "SIGKILL rank 1", "launcher_exit_code": code, "seconds_to_exit": round(time.monotonic() - t0, 1),
              "iterations_lost": lost, "leaked_segments": len(segments() - before), "temp_files": temp_files(out)}
    return {**result, **_resume(launcher, args, out, workdir, reference)}


def preempt(launcher: str, data: dict, workdir: Path, reference: Path) -> dict:
    out, before = workdir / f"preempt-{launcher}", segments()
    args = overrides(data, out, 8)
    launch = Launch(launcher, args, workdir)
    wait_for_iteration(out, 3, launch)
    launch.signal_launcher(signal.SIGTERM)
    t0 = time.monotonic()
    code, _log = launch.wait(120)
    summary = _summary(out)
    result = {"fault": "SIGTERM to the launch script", "launcher_exit_code": code,
              "seconds_to_exit": round(time.monotonic() - t0, 1), "stop": summary.get("stop"),
              "checkpoint_iteration": _last_checkpoint(out),
              "iterations_lost": logged_iteration(out) - _last_checkpoint(out),
              "leaked_segments": len(segments() - before), "temp_files": temp_files(out)}
    return {**result, **_resume(launcher, args, out, workdir, reference)}


def data_rank1(launcher: str, data: dict, workdir: Path) -> dict:
    """Rank 1's first batch holds truncated images; rank 0's is fine and reaches the first BN collective."""
    import shutil

    from hvdet.data.samplers import shard_indices

    source, root = Path(data["train_ann"]).parent.parent, workdir / "bad-data"
    shutil.copytree(source, root, dirs_exist_ok=True)
    ann = json.loads((root / Path(data["train_ann"]).relative_to(source)).read_text())
    images = sorted(ann["images"], key=lambda i: i["id"])
    bad = [images[i]["file_name"] for i in shard_indices(len(images), 1, 2, 0, 0)]
    folder = root / Path(data["train_images"]).relative_to(source)
    for name in bad:
        blob = (folder / name).read_bytes()
        (folder / name).write_bytes(blob[: len(blob) // 3])
    copy = {k: str(root / Path(v).relative_to(source)) for k, v in data.items()}
    out, before = workdir / f"data-{launcher}", segments()
    launch = Launch(launcher, overrides(copy, out, 4), workdir)
    code, log = launch.wait(120)
    return {"fault": "truncated images in rank 1's first batch", "launcher_exit_code": code,
            "names_the_file": any(name in log for name in bad), "message": _hvdet_lines(log),
            "leaked_segments": len(segments() - before), "temp_files": temp_files(out) if out.exists() else []}


def disk_full(data: dict, workdir: Path) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    out = workdir / "full"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    try:
        launch = Launch("horovodrun", overrides(data, out, 4, **{"checkpoint.interval": 2}), workdir)
        code, log = launch.wait(120)
        result = {"fault": "run directory on a 1 MiB file system", "launcher_exit_code": code,
                  "message": _hvdet_lines(log), "names_the_file": "iter_0000002.pt" in log,
                  "temp_files": temp_files(out)}
    finally:
        subprocess.run(["umount", str(out)], check=False)
    return result


def elastic_kill(data: dict, workdir: Path, iterations: int = 30, kill_at: int = 7, commit_interval: int = 3,
                 demo: bool = False) -> dict:
    """3 elastic ranks on two host names of this machine; the one on 127.0.0.1 is killed (Horovod
    then blacklists that host) and the other two continue from the last commit. ``demo``: the demo
    recipe as it is (its data, 8 images per rank, its target), else shrunk like the others."""
    out, before = workdir / f"elastic-{time.monotonic_ns()}", segments()
    hosts = workdir / "hosts.elastic"
    hosts.write_text("localhost:2\n127.0.0.1:1\n")
    keys = {"elastic.enabled": "true", "elastic.commit_interval": commit_interval, "comm.timeout_s": 30}
    if demo:
        root = Path(data["train_ann"]).parent.parent
        args = [f"{k}={v}" for k, v in {"data.root": root, "output_dir": out, "log.interval": 1,
                                          "log.progress": "false", **keys}.items()]
    else:
        args = overrides(data, out, iterations, **keys)
    program = [sys.executable, "train.py", "--config", RECIPE, *args]
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", "3", "--min-np", "2", "--max-np", "3",
           "--host-discovery-script", "launch/discover_hosts.sh", *program]
    log_path = workdir / f"elastic-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "HVDET_HOSTS_FILE": str(hosts)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        killed_at, t_kill = None, None
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if killed_at is None and logged_iteration(out) >= kill_at:
                victim = _rank_on_host(proc.pid, "127.0.0.1")
                if victim is not None:
                    killed_at, t_kill = logged_iteration(out), time.monotonic()
                    victim.kill()
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    records = _records(out)
    change = next((r for r in records if r["type"] == "world"), None)
    train_its = [r["iteration"] for r in records if r["type"] == "train"]
    return {"fault": "SIGKILL 1 of 3 elastic ranks", "launcher_exit_code": code, "killed_at_iteration": killed_at,
            "continued_from_commit": change and change["iteration"], "world_sizes": change and
            [change["previous_world_size"], change["world_size"]],
            "iterations_lost": None if change is None or killed_at is None else killed_at - change["iteration"],
            "seconds_to_continue": _seconds_to_continue(out, change, t_kill), "summary": _summary(out),
            "duplicate_records": len(train_its) - len(set(train_its)), "leaked_segments": len(segments() - before),
            "log_tail": log_path.read_text()[-1500:] if code else ""}


def _rank_on_host(launcher_pid: int, host: str):
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "train.py" in " ".join(p.cmdline()) and p.name().startswith("python") \
                    and p.environ().get("HOROVOD_HOSTNAME") == host:
                return p
        except psutil.Error:
            continue
    return None


def _seconds_to_continue(out: Path, change: dict | None, t_kill: float | None) -> float | None:
    """From the kill to the first iteration logged after the world change (metrics.jsonl's mtime
    would be coarse: this reads elapsed_s, which runs on through the recovery)."""
    if change is None:
        return None
    records = _records(out)
    after = [r for r in records[records.index(change) + 1:] if r["type"] == "train"]
    before = [r for r in records[:records.index(change)] if r["type"] == "train"]
    if not after or not before:
        return None
    return round(after[0]["elapsed_s"] - before[-1]["elapsed_s"], 1)


# ---------------------------------------------------------------------------------------------

def reference_run(data: dict, workdir: Path) -> Path:
    """8 iterations without faults: the weights every resumed experiment must end with."""
    out = workdir / "reference"
    launch = Launch("horovodrun", overrides(data, out, 8), workdir)
    code, log = launch.wait(300)
    if code != 0:
        raise RuntimeError(f"the reference run failed: {log[-2000:]}")
    return out / "checkpoints" / "iter_0000008.pt"


def _resume(launcher: str, args: list[str], out: Path, workdir: Path, reference: Path) -> dict:
    code, _log = Launch(launcher, [*args, "--resume", str(out)], workdir).wait(300)
    final = out / "checkpoints" / "iter_0000008.pt"
    return {"resume_exit_code": code, "resumed_equals_uninterrupted": final.exists() and same_weights(final, reference),
            "elapsed_s_monotonic": _monotonic_elapsed(out), "duplicate_records": _duplicates(out)}


def _summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _last_checkpoint(out: Path) -> int:
    found = sorted((out / "checkpoints").glob("iter_*.pt"))
    return int(found[-1].stem.split("_")[1]) if found else 0


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _monotonic_elapsed(out: Path) -> bool:
    t = [r["elapsed_s"] for r in _records(out) if r["type"] == "train"]
    return all(a <= b for a, b in itertools.pairwise(t))


def _duplicates(out: Path) -> int:
    its = [r["iteration"] for r in _records(out) if r["type"] == "train"]
    return len(its) - len(set(its))


def _hvdet_lines(log: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if "hvdet:" in line][:6]


def _names_rank(log: str, rank: int) -> bool:
    # The waiting rank's time-out ("group ranks [1] did not arrive"), or the stalled rank's own
    # watchdog ("rank 1: no progress ..."), or another's listing ("last progress: rank 1 16 s ago").
    return any(f"ranks [{rank}]" in line or f"rank {rank} on " in line and ": no progress" in line
               or f"last progress: rank {rank} " in line
               for line in log.splitlines())


EXPERIMENTS = ("stall-horovodrun", "stall-mpirun", "kill-horovodrun", "kill-mpirun", "preempt-horovodrun",
               "preempt-mpirun", "data-rank1", "disk-full", "elastic-kill")


def run(names, workdir: Path) -> dict:
    data = make_data(workdir / "data")
    reference = reference_run(data, workdir) if any(n.split("-")[0] in ("kill", "preempt") for n in names) else None
    results = {}
    for name in names:
        kind, _, launcher = name.partition("-")
        if kind == "stall":
            results[name] = stall(launcher, data, workdir)
        elif kind == "kill":
            results[name] = kill(launcher, data, workdir, reference)
        elif kind == "preempt":
            results[name] = preempt(launcher, data, workdir, reference)
        elif name == "data-rank1":
            results[name] = data_rank1("horovodrun", data, workdir)
        elif name == "elastic-kill":
            results[name] = elastic_kill(data, workdir)
        else:
            results[name] = disk_full(data, workdir)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hvdet-chaos-") as tmp:
        results = run(args.only, Path(tmp))
    Path(args.out).write_text(json.dumps({"provenance": provenance(), "results": results}, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

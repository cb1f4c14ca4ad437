"""The launch/ scripts, the Horovod build and the Dockerfile, exercised for real on localhost."""
import itertools
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

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


def _backends(out) -> dict:
    """allreduce_check.py --backends' report (rank 0's JSON line)."""
    found = re.findall(r"backends: (\{.*\})", out)
    assert len(found) == 1, out
    return json.loads(found[0])


def test_horovodrun_script_on_localhost(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    out = run_command(["bash", "launch/horovodrun.sh", "-f", str(hostfile), "--gloo", "--", *CHECK, "--backends"],
                      timeout_s=300, env=_env())
    _assert_two_ranks_ok(out)
    assert "controller gloo" in out
    # Horovod's own timeline names the backend that reduced the CPU tensors, fp16-compressed ones too.
    report = _backends(out)
    assert report["allreduce_backends"] == ["GLOO_ALLREDUCE"] and report["exact"] == {"none": True, "fp16": True}


def test_mpirun_script_on_localhost():
    out = run_command(["bash", "launch/mpirun.sh", "-n", "2", "--", *CHECK, "--backends"], timeout_s=300,
                      env=_env(HVDET_IN_CONTAINER="1"))
    _assert_two_ranks_ok(out)
    assert "controller mpi" in out and "-bind-to none" in out
    report = _backends(out)
    assert report["allreduce_backends"] == ["MPI_ALLREDUCE"] and report["exact"] == {"none": True, "fp16": True}


def test_slurm_script_builds_hostfile_and_launches(tmp_path):
    # No SLURM daemon runs here: a stand-in scontrol answers the one query the script makes;
    # the ranks themselves are started by the real mpirun.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho localhost\n")
    (fake / "scontrol").chmod(stat.S_IRWXU)
    # The script works in the submission directory (runs/ for the hostfile, .venv, launch/): a checkout-like
    # one under tmp_path, so that the test writes nothing into this checkout's runs/.
    submit = tmp_path / "submit"
    submit.mkdir()
    for name in ("launch", ".venv"):
        (submit / name).symlink_to(ROOT / name)
    env = _env(PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="t1",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="2",
               SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(submit), HVDET_IN_CONTAINER="1",
               HVDET_ENTRY="launch/allreduce_check.py")
    out = run_command(["bash", "launch/slurm.sbatch", "configs/none.yaml"], timeout_s=300, env=env)
    _assert_two_ranks_ok(out)
    assert (submit / "runs" / "hostfile-t1").read_text() == "localhost slots=2\n"
    assert "--hostfile runs/hostfile-t1" in out  # mpirun.sh's command line (set -x), relative to the submit dir


def test_slurm_script_in_a_container_forwards_preemption_and_requeues(tmp_path):
    """HVDET_IMAGE: the ranks start by srun inside the image; SLURM's warning signal (USR1) reaches
    them, their exit code 75 (preempted) comes back through HVDET_EXIT_FILE, and the job is requeued
    (stand-ins for srun and scontrol record what they were asked: no SLURM here)."""
    import signal
    import time

    fake, logs, submit = tmp_path / "bin", tmp_path / "logs", tmp_path / "submit"
    for d in (fake, logs, submit):
        d.mkdir()
    (submit / "launch").symlink_to(ROOT / "launch")
    (fake / "srun").write_text(f"""#!/bin/bash
echo "$@" > {logs}/srun.args
trap 'echo USR1 >> {logs}/srun.signals; echo 75 >> "$HVDET_EXIT_FILE"; kill $SLEEPER; exit 1' USR1
sleep 60 & SLEEPER=$!
wait
""")
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {logs}/scontrol.args\n")
    for name in ("srun", "scontrol"):
        (fake / name).chmod(stat.S_IRWXU)
    env = _env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="t2", SLURM_SUBMIT_DIR=str(submit),
               HVDET_IMAGE="hvdet:v100")
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/demo.yaml", "seed=3"],
                            cwd=submit, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        if (logs / "srun.args").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    args = (logs / "srun.args").read_text()
    assert "--container-image=hvdet:v100" in args and f"--container-mounts={submit}:{submit}" in args, args
    assert "/opt/hvdet/.venv/bin/python train.py --config configs/demo.yaml output_dir=runs/demo-t2 seed=3" in args
    assert (logs / "srun.signals").read_text() == "USR1\n"
    assert (logs / "scontrol.args").read_text() == "requeue t2\n"


@pytest.mark.slow  # horovodrun --check-build imports torch and Horovod's frameworks: 6-7 s
def test_horovod_build_lists_frameworks_and_controllers():
    out = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True, check=True).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out
    import torch
    if torch.version.cuda:  # a CUDA build of torch makes the build script compile NCCL support
        assert "[X] NCCL" in out, out


@pytest.mark.slow
def test_build_script_is_idempotent():
    out = subprocess.run(["bash", "launch/build_horovod.sh"], cwd=ROOT, capture_output=True, text=True,
                         env=_env(PYTHON=sys.executable), check=True).stdout
    assert "already installed" in out


# -- Dockerfile: hadolint, and what each documented build resolves to and installs ------------------
# docs/docker.md's table says, per `--build-arg GPU=...`, which base image, which torch build and which
# Horovod kernels an image gets. The Dockerfile is parsed into instructions and resolved for each value
# (ARG, FROM through the stage aliases, ENV); its RUN steps are then executed by /bin/sh with PATH holding
# only logging stand-ins for the programs they call (apt-get, rm, python3, make, the venv's pip/python),
# in an empty directory, so the test sees the commands the build would run in order, with the build's
# variables expanded, and nothing is installed or removed.

DOCS = ROOT / "docs" / "docker.md"
STUB = r"""#!/bin/sh
case "$0" in "$STUBS"/*) name=${0##*/} ;; *) name=$0 ;; esac
{ printf '%s' "$name"; for a in "$@"; do printf '\t%s' "$a"; done; printf '\n'; } >> "$STUB_LOG"
venv=
[ "$name" = python3 ] && [ "$1" = -m ] && [ "$2" = venv ] && venv=$3
[ "$name" = make ] && for a in "$@"; do [ "$a" = venv ] && venv=.venv; done  # as `make venv` does
if [ -n "$venv" ] && [ ! -e "$venv/bin/python" ]; then
  /bin/mkdir -p "$venv/bin" && for t in python pip horovodrun; do /bin/cp "$STUBS/python3" "$venv/bin/$t"; done
fi
exit 0
"""


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] as Docker reads them: continuation lines joined, comment lines (also
    inside a continued instruction, where hadolint pragmas sit) and blank lines dropped."""
    instructions, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        word, _, rest = (buf + stripped).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        buf = ""
    return instructions


def _expand(text: str, variables: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


@dataclass
class Image:
    base: str  # the registry image the build starts from, after FROM aliases
    env: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)  # (shell command, the ENV in force at that RUN)
    entrypoint: list | None = None


def resolve(instructions, build_args: dict) -> Image:
    """The final stage of a `docker build --build-arg K=V ...`, followed through the FROM stage aliases."""
    args, stages, image = {}, {}, None
    for word, rest in instructions:
        if word == "ARG" and image is None:  # a global ARG: the only kind FROM lines can use
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default)
        elif word == "FROM":
            ref, *alias = re.split(r"\s+AS\s+", _expand(rest, args), flags=re.IGNORECASE)
            if ref in stages:
                parent = stages[ref]
                image = Image(parent.base, dict(parent.env), list(parent.runs), parent.entrypoint)
            elif re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", ref):  # a namespaced, tagged registry image
                image = Image(ref)
            else:  # docker would look for docker.io/library/<ref>:latest, which is no image of ours
                raise ValueError(f"FROM {ref}: neither a stage of this Dockerfile nor a tagged image")
            if alias:
                stages[alias[0]] = image
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                image.env[key] = _expand(value, image.env)
        elif word == "RUN":
            image.runs.append((rest, dict(image.env)))
        elif word == "ENTRYPOINT":
            image.entrypoint = json.loads(rest)
    return image


def simulate_runs(image: Image, workdir) -> list[list[str]]:
    """Execute the image's RUN steps with stand-ins (see above); return every command called, as argv lists."""
    stubs = workdir / "stubs"
    stubs.mkdir()
    for name in ("apt-get", "rm", "python3", "make"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    log, build = workdir / "calls.log", workdir / "build"
    build.mkdir()
    for command, env in image.runs:
        proc = subprocess.run(["/bin/sh", "-c", command], cwd=build, capture_output=True, text=True, check=False,
                              env={**env, "PATH": str(stubs), "HOME": str(workdir), "STUBS": str(stubs),
                                   "STUB_LOG": str(log)})
        assert proc.returncode == 0, f"RUN {command}\n{proc.stdout}{proc.stderr}"
    return [line.split("\t") for line in log.read_text().splitlines()]


def documented_builds() -> dict:
    """docs/docker.md's first table, one row per GPU value: base image, torch, Horovod's arch list."""
    lines = DOCS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    torch_column = next(c for c in header if c.startswith("torch "))
    builds = {}
    for row in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=True))
        wheel = re.fullmatch(r"`([\d.]+)\+(cu\d+)` from `([^`]+)`", cells[torch_column])
        pypi = re.fullmatch(r"PyPI \(a CUDA (\d+\.\d+) build\)", cells[torch_column])
        assert wheel or pypi, cells[torch_column]
        builds[re.search(r"GPU=(\w+)", cells["Build"])[1]] = {
            "default": "(the default)" in cells["Build"], "gpus": cells["GPUs"],
            "base": cells["Base image"].strip("`"),
            "torch": torch_column.split()[1],  # the header names the version every row installs
            "wheel": wheel and {"version": wheel[1], "tag": wheel[2], "index": "https://" + wheel[3]},
            "pypi_cuda": pypi and pypi[1],
            "cc_list": re.fullmatch(r"`HOROVOD_BUILD_CUDA_CC_LIST=([\d,]+)`", cells["Horovod kernels"])[1],
        }
    return builds


def _cuda_of_base(base: str) -> tuple[int, int]:
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu[\d.]+", base)
    assert m, base
    return int(m[1]), int(m[2])


def _setup_pins() -> dict:
    return {Requirement(r).name: Requirement(r).specifier
            for r in re.findall(r'"((?:torch|torchvision)==[\d.]+)"', (ROOT / "setup.py").read_text())}


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_documented_builds_are_the_dockerfile_builds():
    """Every GPU value of docs/docker.md's table, and only those, builds; no build argument is the default row."""
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    builds = documented_builds()
    assert set(builds) >= {"hopper", "v100"} and [g for g, b in builds.items() if b["default"]] == ["hopper"]
    assert resolve(instructions, {}).base == builds["hopper"]["base"]
    for gpu, doc in builds.items():
        assert resolve(instructions, {"GPU": gpu}).base == doc["base"], gpu
    with pytest.raises(ValueError, match="FROM base-ampere: neither a stage"):  # as docs/docker.md says
        resolve(instructions, {"GPU": "ampere"})


@pytest.mark.parametrize("gpu", sorted(documented_builds()))
@pytest.mark.slow
def test_dockerfile_build_installs_what_docs_say(gpu, tmp_path):
    doc = documented_builds()[gpu]
    image = resolve(dockerfile_instructions((ROOT / "Dockerfile").read_text()), {"GPU": gpu})
    cuda = _cuda_of_base(image.base)
    cc_list = image.env["HOROVOD_BUILD_CUDA_CC_LIST"]
    assert cc_list == doc["cc_list"]
    if "sm_70" in doc["gpus"] or "V100" in doc["gpus"]:
        # DESIGN.md: CUDA 13 dropped sm_70, so a V100 image needs a CUDA 12 toolkit and Horovod kernels for 70.
        assert cuda[0] == 12 and "70" in cc_list.split(","), (image.base, cc_list)
    if "70" in cc_list.split(","):
        assert cuda[0] < 13, f"{gpu}: CUDA {cuda} cannot compile the sm_70 kernels it is asked for"

    calls = simulate_runs(image, tmp_path)

    def first(what, match):
        found = [i for i, c in enumerate(calls) if match(c)]
        assert found, f"{gpu}: the build never runs {what}; it runs {calls}"
        return found[0]

    make_venv = first("make venv", lambda c: c[0] == "make" and "venv" in c[1:])
    arch_check = first("the torch arch check", lambda c: c[:2] == [".venv/bin/python", "-c"])
    make_horovod = first("make horovod", lambda c: c[0] == "make" and "horovod" in c[1:])
    make_setup = first("make setup", lambda c: c == ["make", "setup"])
    # The order a local checkout uses, with the arch check before the long Horovod build.
    assert make_venv < arch_check < make_horovod < make_setup, calls
    assert calls[-1] == [".venv/bin/horovodrun", "--check-build"] and image.entrypoint == ["horovodrun"]

    pins = _setup_pins()
    assert str(pins["torch"]) == f"=={doc['torch']}"
    installs = [c for c in calls if c[0].endswith("pip") and "install" in c[1:]]
    early_installs = [c for c in calls[:make_venv] if c[:2] == [".venv/bin/pip", "install"]]
    assert installs == early_installs, installs  # nothing is installed over `make venv`'s choice afterwards
    if doc["wheel"]:
        # PyTorch's cuXYZ wheels go into .venv first, from PyTorch's index for that CUDA release ...
        assert len(early_installs) == 1, early_installs
        pip = early_installs[0]
        assert pip[pip.index("--index-url") + 1] == doc["wheel"]["index"]
        wanted = {Requirement(a).name: Version(str(Requirement(a).specifier).lstrip("=")) for a in pip[2:]
                  if not a.startswith("-") and a != doc["wheel"]["index"]}
        assert set(wanted) == set(pins) == {"torch", "torchvision"}
        assert str(wanted["torch"]) == f"{doc['wheel']['version']}+{doc['wheel']['tag']}"
        for name, version in wanted.items():
            assert version.local == doc["wheel"]["tag"] == f"cu{cuda[0]}{cuda[1]}", (name, version, image.base)
            # ... and satisfy setup.py's pins (PEP 440 ignores the local label), so `make venv` keeps them.
            assert pins[name].contains(version), (name, version, pins[name])
    else:
        # No early install: `make venv` installs setup.py's pins from PyPI, whose torch build is the CUDA
        # release the docs name, which must be the base image's.
        assert early_installs == [], early_installs
        assert doc["pypi_cuda"] == f"{cuda[0]}.{cuda[1]}", (doc["pypi_cuda"], image.base)

    # The build's arch check, run with this machine's torch: it passes exactly when torch has kernels for
    # every arch in the list (so a wheel without sm_70 stops the v100 build before Horovod is compiled).
    code = calls[arch_check][2]
    have = torch.cuda.get_arch_list()
    proc = subprocess.run([sys.executable, "-c", code], env={**rank_env(), "HOROVOD_BUILD_CUDA_CC_LIST": cc_list},
                          capture_output=True, text=True, check=False)
    missing = [f"sm_{c}" for c in cc_list.split(",") if f"sm_{c}" not in have]
    assert (proc.returncode == 0) == (not missing), proc.stdout + proc.stderr
    if missing:
        assert f"has no kernels for {missing}" in proc.stderr, proc.stderr


def test_docker_context_leaves_out_the_host_venv():
    # `COPY . .` after the image built its .venv: the host's .venv (another torch build) must not replace it.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    copies = [rest.split() for word, rest in dockerfile_instructions((ROOT / "Dockerfile").read_text())
              if word == "COPY"]
    assert [".", "."] in copies

@pytest.mark.slow
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


@pytest.mark.slow
def test_gpu_check_horovod_part_rehearsed_on_cpu(tmp_path):
    """gpu_check's Horovod part as the lent GPU runs it, on CPU tensors: under `horovodrun -np 1`, the
    grouped allreduce (fp32 and fp16-compressed) exact and through the backend Horovod's timeline names
    (Gloo here; NCCL is the pass mark on a GPU), `pytest -m gpu` under it, and the demo trained under it
    with solver.fp16_allreduce to its target (~1 min)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU check runs this part on it")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--only", "horovod"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "horovod rehearsal on CPU passed" in proc.stdout
    report = json.loads(proc.stdout.split("gpu-check: horovod: ", 1)[1].splitlines()[0])
    assert report["allreduce_check"]["allreduce_backends"] == ["GLOO_ALLREDUCE"]
    assert report["demo_fp16_allreduce"]["reached"] and not report["nccl_path"]


@pytest.mark.slow
def test_gpu_check_host_overhead_part_runs_on_cpu():
    """gpu_check's host-overhead part (benchmarks/gpu_host.py) with the Triton interpreter on CPU tensors,
    a few calls each: every piece it times runs, the cProfile is there (the GPU run must not be what finds
    a typo)."""
    from benchmarks.gpu_host import bench_host_overhead

    r = bench_host_overhead(calls=2, rounds=1, device=torch.device("cpu"))
    times = r["host_us_per_call"]
    assert len(times) == 22 and all(t > 0 for t in times.values()), times
    assert r["device_ops_per_layer_step"] == {"cudnn_batchnorm": None, "cgbn_triton": None}
    assert any("_CrossGPUBatchNormFn" in line or "group_moments" in line for line in r["cgbn_forward_cprofile"])


def test_gpu_check_horovod_pass_marks():
    """The Horovod part fails on the wrong backend, an inexact run, failed tests or a missed target, and
    is not required where Horovod is absent."""
    from benchmarks.gpu_check import horovod_ok

    good = {"allreduce_check": {"returncode": 0, "allreduce_backends": ["NCCL_ALLREDUCE"]},
            "pytest_gpu_under_horovodrun": {"returncode": 0}, "demo_fp16_allreduce": {"reached": True}}
    assert horovod_ok(good, backend="NCCL_ALLREDUCE")
    assert not horovod_ok(good, backend="GLOO_ALLREDUCE")
    assert not horovod_ok({**good, "allreduce_check": {"returncode": 1, "allreduce_backends": ["NCCL_ALLREDUCE"]}},
                          backend="NCCL_ALLREDUCE")
    assert not horovod_ok({**good, "pytest_gpu_under_horovodrun": {"returncode": 1}}, backend="NCCL_ALLREDUCE")
    assert not horovod_ok({**good, "demo_fp16_allreduce": {"error": "exited 1"}}, backend="NCCL_ALLREDUCE")
    assert horovod_ok({"skipped": "Horovod is not importable here"}, backend="NCCL_ALLREDUCE")
    assert horovod_ok({}, backend="NCCL_ALLREDUCE")


def test_provenance_names_the_source_files_themselves(tmp_path):
    """benchmarks/provenance.py's source_sha256: the same for the same files, changed by an edit or a new
    source file, blind to what is not source (where a copied tree's stale .git names the wrong commit)."""
    from benchmarks.provenance import provenance, source_sha256

    (tmp_path / "hvdet" / "ops").mkdir(parents=True)
    (tmp_path / "hvdet" / "ops" / "bn.py").write_text("x = 1\n")
    first = source_sha256(tmp_path)
    (tmp_path / "notes.txt").write_text("not source")
    assert source_sha256(tmp_path) == first and len(first) == 64
    (tmp_path / "hvdet" / "ops" / "bn.py").write_text("x = 2\n")
    assert source_sha256(tmp_path) != first
    (tmp_path / "hvdet" / "ops" / "bn.py").write_text("x = 1\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "new.py").write_text("")
    assert source_sha256(tmp_path) != first
    assert provenance()["source_sha256"] == source_sha256()

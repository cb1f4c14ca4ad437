"""comm.gradients: ddp, train.py under torchrun with gradients averaged by DistributedDataParallel.

The oracle: the same tiny 2-rank run (Cross-GPU BN, PMD-LAMB, AGVM) under horovodrun and under
torchrun logs the same losses at every iteration (asserted to 1e-6 relative; on 2 CPU ranks they
came out bit for bit equal, as DDP's 1/2 before the sum and Horovod's after it are exact). The
torchrun runs hide Horovod (a broken ``horovod`` package first on the path): the ddp path must not
need it.
"""
import json
import subprocess
import sys

import pytest
import torch

from hvdet.config import ConfigError, load_config
from tests.harness import ROOT, launch_command, rank_env, run_command, run_ranks
from tests.test_train import RECIPE, tiny_overrides

LAUNCH_TIMEOUT_S = 300  # only to kill a hung launch
# Cross-GPU BN (the recipe's norm) and PMD-LAMB (its optimizer), AGVM due at iterations 0 and 2, a
# train record per iteration so that losses compare iteration by iteration.
OVERRIDES = ["agvm.enabled=true", "agvm.interval=2", "log.interval=1"]


def no_horovod(folder) -> str:
    """``folder``, holding a ``horovod`` package that does not import: put it first on PYTHONPATH."""
    pkg = folder / "horovod"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise ImportError('hidden by tests/test_ddp.py')\n")
    return str(folder)


def train(args: list[str], launcher: str, path_first: str | None = None) -> str:
    """train.py on 2 ranks; ``path_first``: a folder put first on the ranks' PYTHONPATH."""
    env = rank_env(threads=1)
    if path_first is not None:
        env["PYTHONPATH"] = f"{path_first}:{env['PYTHONPATH']}"
    return run_command(launch_command(2, launcher, ["train.py", "--config", RECIPE, *args]), LAUNCH_TIMEOUT_S, env)


def records(out, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hvdet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def hidden_horovod(tmp_path_factory) -> str:
    return no_horovod(tmp_path_factory.mktemp("nohorovod"))


@pytest.fixture(scope="module")
def ddp_run(data, hidden_horovod, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    log = train([*tiny_overrides(data, out), *OVERRIDES, "comm.gradients=ddp"], "torchrun", hidden_horovod)
    return out, log


@pytest.fixture(scope="module")
def horovod_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("horovod")
    return out, train([*tiny_overrides(data, out), *OVERRIDES, "eval.at_end=false"], "horovodrun")


# -- one process: configuration and launch errors -----------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["comm.gradients=nccl"], "comm.gradients must be one of horovod, ddp"),
    (["comm.gradients=ddp", "elastic.enabled=true"], "elastic.enabled is Horovod elastic and needs comm.gradients"),
    (["comm.gradients=ddp", "bn.backend=horovod"], "bn.backend=horovod needs comm.gradients=horovod"),
    (["comm.gradients=ddp", "bn.backend=mpi"], "bn.backend=mpi needs comm.gradients=horovod"),
])
def test_recipe_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / RECIPE, overrides)
    load_config(ROOT / RECIPE, ["comm.gradients=ddp", "bn.backend=torch", "solver.fp16_allreduce=true"])


def test_a_launcher_that_does_not_match_is_a_config_error(monkeypatch):
    from hvdet import comm

    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1"}
    for key in (*torchrun, "HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "0")  # as horovodrun sets it
    with pytest.raises(ConfigError, match=r"comm.gradients=ddp needs torchrun .* started this process"):
        comm.init(gradients="ddp")
    monkeypatch.delenv("HOROVOD_RANK")
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="torchrun started this process, but comm.gradients=horovod: add comm.grad"):
        comm.init()  # before any rendezvous: nothing was initialized
    assert comm.gradients() == "horovod"


@pytest.mark.slow  # a subprocess that imports torch (and torchvision): 5-8 s
def test_train_py_under_horovodrun_env_with_ddp_exits_2_with_one_line(data, tmp_path):
    env = {**rank_env(), "HOROVOD_RANK": "0"}
    proc = subprocess.run([sys.executable, "train.py", "--config", RECIPE, *tiny_overrides(data, tmp_path),
                           "comm.gradients=ddp"], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hvdet: rank 0: config error: comm.gradients=ddp needs torchrun"), proc.stderr


ONE_PROCESS = """
import torch
from hvdet import comm
from hvdet.step import StepSettings, train_step
comm.init(gradients="ddp")
assert (comm.gradients(), comm.size(), comm.horovod_available()) == ("ddp", 1, False)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, images, targets):
        return {"loss": (self.lin(torch.stack(images)) - torch.stack([t["y"] for t in targets])).pow(2).mean()}

torch.manual_seed(0)
model, plain = Net(), Net()
plain.load_state_dict(model.state_dict())
opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(),
                                 backward_passes_per_step=2, model=model)
assert isinstance(opt, torch.optim.SGD) and isinstance(opt.ddp, torch.nn.parallel.DistributedDataParallel)
plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
batches = [([torch.randn(3) for _ in range(2)], [{"y": torch.randn(1)} for _ in range(2)]) for _ in range(8)]
scaler = torch.amp.GradScaler("cpu", enabled=False)
for net, o in ((model, opt), (plain, plain_opt)):
    for k in range(4):
        train_step(net, o, scaler, iter(batches[2 * k:2 * k + 2]), StepSettings(passes=2), step=k, lr=0.1)
assert list(model.state_dict()) == ["lin.weight", "lin.bias"]  # no "module." prefix
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
assert opt.state_dict()["state"].keys() == plain_opt.state_dict()["state"].keys()
print("ok")
"""


@pytest.mark.slow  # a subprocess that imports torch (and torchvision): 5-8 s
def test_one_plain_process_trains_through_ddp_without_horovod(tmp_path):
    """A world of one over torch.distributed (no port, no launcher), Horovod not importable: two
    backward passes per step through DDP == the plain optimizer, bit for bit."""
    env = {**rank_env(), "PYTHONPATH": f"{no_horovod(tmp_path)}:{ROOT}"}
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# -- 2 ranks under torchrun ----------------------------------------------------------------------------

def case_world():
    """The world API over torch.distributed, and DDP's averaging over 2 backward passes per step."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from hvdet import comm

    r, n = comm.rank(), comm.size()
    x = torch.tensor([float(r + 1), 10.0 * r])
    out = {"rank": r, "size": n, "local": (comm.local_rank(), comm.local_size()), "gradients": comm.gradients(),
           "controller": comm.controller(),
           "sum": comm.allreduce(x, "sum").tolist(), "mean": comm.allreduce(x, "mean").tolist(),
           "max": comm.allreduce(x, "max").tolist(), "small": comm.allreduce_small(x, "mean").tolist(),
           "objects": comm.allgather_object(None if r == 0 else f"r{r}"),
           "bcast": comm.broadcast_object(f"from {r}", root_rank=n - 1),
           "gathered": comm.gather_object({"rank": r, "pad": "x" * (100_000 * r)}, root_rank=n - 1)}
    group = comm.consecutive_groups(n)
    cpu = torch.device("cpu")
    out["groups"] = (group.resolve_backend(cpu), group.resolve_backend(cpu, numel=10**5),
                     group.allreduce(torch.ones(10**5), "sum")[0].item())
    for backend in ("horovod", "mpi"):
        try:
            group.allreduce(x, "sum", backend)
        except RuntimeError as err:
            out[backend] = str(err)
    comm.barrier()
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(model.weight, float(r))
    comm.broadcast_parameters(model.state_dict())
    opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(),
                                     backward_passes_per_step=2, model=model)
    calls = []

    def counting(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    opt.ddp.register_comm_hook(None, counting)
    opt.zero_grad()
    for k in range(2):  # rank r, pass k: input (r + 1) * (k + 1) in both features
        with opt.forward_pass(last=k == 1) as module:
            loss = module(torch.full((1, 2), float((r + 1) * (k + 1)))).sum() / 2
        loss.backward()
    opt.synchronize()
    out["grad"], out["allreduces"] = model.weight.grad.tolist(), len(calls)
    with opt.skip_synchronize():
        opt.step()
    opt.state[model.weight]["mark"] = torch.tensor(float(r))  # rank 0's goes to everyone
    comm.broadcast_optimizer_state(opt)
    out["mark"] = opt.state[model.weight]["mark"].item()
    return out


def test_world_api_and_gradient_averaging_under_torchrun():
    ranks = run_ranks("tests.test_ddp:case_world", np=2, launcher="torchrun", timeout_s=LAUNCH_TIMEOUT_S)
    for r, out in enumerate(ranks):
        assert (out["rank"], out["size"], out["local"]) == (r, 2, (r, 2))
        assert (out["gradients"], out["controller"]) == ("ddp", "gloo")
        assert out["sum"] == [3.0, 10.0] and out["mean"] == [1.5, 5.0] and out["max"] == [2.0, 10.0]
        assert out["small"] == [1.5, 5.0] and out["objects"] == [None, "r1"] and out["bcast"] == "from 1"
        assert out["groups"] == ("shm", "torch", 2.0)  # CGBN's auto: shared memory, then torch.distributed
        assert "needs Horovod's world (comm.gradients=horovod)" in out["horovod"] and "mpirun" in out["mpi"]
        # d loss / d w = (r + 1)(k + 1) / 2 per feature, summed over passes k = 0, 1: 1.5 (r + 1); the
        # mean over ranks 0, 1: 2.25, from one allreduce (the first pass accumulated locally).
        assert out["grad"] == [[2.25, 2.25]] and out["allreduces"] == 1
        assert out["mark"] == 0.0
    assert ranks[0]["gathered"] is None and [g["rank"] for g in ranks[1]["gathered"]] == [0, 1]
    assert len(ranks[1]["gathered"][1]["pad"]) == 100_000


def test_torchrun_trains_with_cgbn_pmdlamb_agvm_and_writes_once(ddp_run):
    out, log = ddp_run
    train = records(out)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]  # one writer: rank 0 of one world of 2
    assert "agvm_variance" in train[0] and "agvm_variance" in train[2]
    assert len(records(out, "eval")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch_size"], summary["iterations"], summary["stop"]) == \
        (2, 4, 4, "max_iters")
    assert (summary["norm"], summary["optimizer"]) == ("cross_gpu", "pmdlamb")
    assert load_config(out / "config.yaml").comm.gradients == "ddp"
    ckpt = checkpoint(out / "checkpoints" / "iter_0000004.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not [k for k in ckpt["model"] if k.startswith("module.")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000002.pt", "iter_0000004.pt", "last.pt"]
    assert "4 iterations on 2 ranks" in log


def test_ddp_and_horovod_log_the_same_losses(ddp_run, horovod_run):
    ddp, horovod = records(ddp_run[0]), records(horovod_run[0])
    assert [r["iteration"] for r in horovod] == [r["iteration"] for r in ddp] == [1, 2, 3, 4]
    worst = max(abs(a["losses"][k] - b["losses"][k]) / abs(b["losses"][k])
                for a, b in zip(ddp, horovod, strict=True) for k in b["losses"])
    print(f"largest relative loss difference, ddp vs horovod, 4 iterations: {worst:.3g}")
    assert worst <= 1e-6
    for a, b in zip(ddp, horovod, strict=True):  # AGVM's lr scales follow the same gradients
        assert a["agvm_lr_scale"] == pytest.approx(b["agvm_lr_scale"], rel=1e-6)
    a, b = (checkpoint(run[0] / "checkpoints" / "iter_0000004.pt") for run in (ddp_run, horovod_run))
    assert a["model"].keys() == b["model"].keys()  # one checkpoint format
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=1e-5, atol=1e-7) for k in a["model"])


def test_resume_under_torchrun_equals_uninterrupted(ddp_run, data, hidden_horovod, tmp_path):
    out_a, _ = ddp_run
    train([*tiny_overrides(data, tmp_path), *OVERRIDES, "comm.gradients=ddp", "eval.at_end=false",
           "--resume", str(out_a / "checkpoints" / "iter_0000002.pt")], "torchrun", hidden_horovod)
    a, b = (checkpoint(out / "checkpoints" / "iter_0000004.pt") for out in (out_a, tmp_path))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():  # PMD-LAMB's moments and step counters
        for name, value in state.items():
            other = b["optimizer"]["state"][pid][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, name)
    assert a["agvm"] == b["agvm"] and a["loader"] == b["loader"]
    assert [r["iteration"] for r in records(tmp_path)] == [3, 4]

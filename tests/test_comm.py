"""hvdet.comm under real launchers (horovodrun --gloo, horovodrun --mpi, mpirun) and in one process."""
import os
import subprocess
import sys

import pytest
import torch

from tests.harness import ROOT, run_ranks


def case_collectives():
    from hvdet import comm

    r, n = comm.rank(), comm.size()
    x = torch.tensor([float(r + 1), 10.0 * r])
    out = {
        "rank": r, "size": n, "local_rank": comm.local_rank(), "main": comm.is_main_process(),
        "controller": comm.controller(),
        "env": {k: os.environ.get(k) for k in ("HOROVOD_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle")},
        "sum": comm.allreduce(x, op="sum").tolist(),
        "mean": comm.allreduce(x, op="mean").tolist(),
        "max": comm.allreduce(x, op="max").tolist(),
        "small_mean": comm.allreduce_small(x, op="mean").tolist(),  # the group path on CPU
        "objects": comm.allgather_object({"rank": r}),
        "mixed": comm.allgather_object(None if r == 0 else f"r{r}"),  # different types must not hang
        "bcast": comm.broadcast_object(f"from {r}", root_rank=n - 1),
        # Only the root receives: an uneven payload (rank 1 sends 100 kB) and None from the others.
        "gathered": comm.gather_object({"rank": r, "pad": "x" * (100_000 * r)}, root_rank=n - 1),
    }
    # After reset the next group use opens its backends again, collectively, and still works.
    before = comm.consecutive_groups(None)
    comm.reset()
    out["after_reset"] = (comm.consecutive_groups(None) is not before,
                          comm.consecutive_groups(None).allreduce(torch.ones(2), "sum", "horovod").tolist())
    comm.barrier()
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, float(r))
    comm.broadcast_parameters(model.state_dict(), root_rank=0)
    out["weight_after_broadcast"] = model.weight.sum().item()
    return out


def case_groups(backends):
    from hvdet import comm
    from hvdet.comm import shm

    r, n = comm.rank(), comm.size()
    out = {}
    for group_size in (1, 2, n):
        group = comm.consecutive_groups(group_size)
        for backend in backends:
            t = torch.tensor([float(r), 1.0])
            out[(group_size, backend)] = (group.ranks, group.rank, group.allreduce(t, "sum", backend).tolist(),
                                          group.allreduce(t, "mean", backend).tolist())
            gathered = group.allgather(torch.tensor([[float(r), 10.0 + r]], dtype=torch.float64), backend)
            out[(group_size, backend, "allgather")] = (tuple(gathered.shape), gathered.dtype, gathered.tolist())
    out["auto"] = comm.consecutive_groups(2).resolve_backend(torch.device("cpu"))
    # Past the shared-memory slot "auto" takes the next backend, on every rank alike.
    big = torch.full((shm.CAPACITY + 1,), float(r), dtype=torch.float64)
    out["big_auto"] = comm.consecutive_groups(2).allreduce(big, "sum")[[0, -1]].tolist()
    x32 = torch.tensor([float(r), -float(r)], dtype=torch.float32)
    g = comm.consecutive_groups(n)
    out["shm_ops"] = {op: g.allreduce(x32, op, "shm") for op in ("max", "min")}
    out["segments_left"] = [os.path.exists(group._backend("shm").segment.path)
                            for group in (g, comm.consecutive_groups(2))]
    return out


def case_group_outlives_other_ranks():
    """Ranks 2-3 leave at once (their exit shuts every rank's Horovod down); ranks 0-1 go on in their
    MPI group afterwards."""
    import time

    from hvdet import comm

    group = comm.consecutive_groups(2)
    t = torch.ones(3, dtype=torch.float64)
    group.allreduce(t, "sum", "mpi")  # the communicator exists on every rank before any leaves
    if comm.rank() >= 2:
        return None
    time.sleep(3)
    for _ in range(50):
        t = group.allreduce(t, "mean", "mpi")
    return group.allgather(t, "mpi").tolist()


def case_distributed_optimizer():
    from hvdet import comm

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    comm.broadcast_parameters(model.state_dict())
    opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters())
    x = torch.full((1, 4), float(comm.rank() + 1))  # each rank a different gradient
    model(x).sum().backward()
    opt.step()
    return model.weight.detach().clone()


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun", "horovodrun-mpi"])
def test_world_collectives(launcher):
    res = run_ranks("tests.test_comm:case_collectives", np=2, launcher=launcher)
    assert [o["rank"] for o in res] == [0, 1]
    for o in res:
        assert o["size"] == 2
        assert o["sum"] == [3.0, 10.0]
        assert o["mean"] == [1.5, 5.0]
        assert o["max"] == [2.0, 10.0]
        assert o["small_mean"] == [1.5, 5.0]
        assert o["objects"] == [{"rank": 0}, {"rank": 1}]
        assert o["mixed"] == [None, "r1"]
        assert o["bcast"] == "from 1"
        assert o["after_reset"] == (True, [2.0, 2.0])
        assert o["weight_after_broadcast"] == 0.0
        assert o["controller"] == ("gloo" if launcher == "horovodrun" else "mpi")
        # hvdet's CPU defaults reached the ranks under every launcher (benchmarks/ddp_baseline.py)
        assert o["env"] == {"HOROVOD_CYCLE_TIME": "20" if launcher == "horovodrun" else "5",
                            "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert [o["main"] for o in res] == [True, False]
    assert res[0]["gathered"] is None
    assert [(g["rank"], len(g["pad"])) for g in res[1]["gathered"]] == [(0, 0), (1, 100_000)]


@pytest.mark.parametrize("launcher,backends", [("horovodrun", ["horovod", "torch", "shm"]),
                                               ("mpirun", ["horovod", "torch", "mpi", "shm"])])
def test_groups_of_consecutive_ranks(launcher, backends):
    res = run_ranks("tests.test_comm:case_groups", np=4, launcher=launcher, backends=backends)
    for r, o in enumerate(res):
        for backend in backends:
            ranks, idx, total, mean = o[(1, backend)]
            assert ranks == (r,) and idx == 0 and total == [r, 1.0]
            ranks, idx, total, mean = o[(2, backend)]
            first = r // 2 * 2
            assert ranks == (first, first + 1) and idx == r - first
            assert total == [2.0 * first + 1, 2.0] and mean == [first + 0.5, 1.0]
            ranks, idx, total, mean = o[(4, backend)]
            assert ranks == (0, 1, 2, 3) and total == [6.0, 4.0] and mean == [1.5, 1.0]
            for group_size, members in ((1, [r]), (2, [first, first + 1]), (4, [0, 1, 2, 3])):
                shape, dtype, rows = o[(group_size, backend, "allgather")]
                assert shape == (group_size, 1, 2) and dtype == torch.float64, (backend, group_size)
                assert rows == [[[float(q), 10.0 + q]] for q in members], (backend, group_size)
        assert o["auto"] == "shm"
        first = r // 2 * 2
        assert o["big_auto"] == [2.0 * first + 1] * 2
        assert o["shm_ops"]["max"].dtype == torch.float32
        assert o["shm_ops"]["max"].tolist() == [3.0, 0.0] and o["shm_ops"]["min"].tolist() == [0.0, -3.0]
        assert o["segments_left"] == [False, False]  # unlinked once every member had mapped it


def test_an_mpi_group_outlives_the_ranks_that_left():
    """Under mpirun Horovod would finalize MPI when any rank's Horovod shuts down (its exit), under
    the groups still working: hvdet initializes MPI first, so Horovod leaves it up."""
    res = run_ranks("tests.test_comm:case_group_outlives_other_ranks", np=4, launcher="mpirun", timeout_s=300)
    assert res[2:] == [None, None]
    assert res[0] == res[1] == [[1.0, 1.0, 1.0]] * 2


def test_distributed_optimizer_averages_gradients():
    w0, w1 = run_ranks("tests.test_comm:case_distributed_optimizer", np=2, launcher="horovodrun")
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()
    assert torch.equal(w0, w1)
    torch.testing.assert_close(w0, ref - 1.5)  # mean of inputs 1 and 2


@pytest.mark.slow
def test_single_process_without_launcher():
    code = ("from hvdet import comm; import torch; comm.init();"
            "g = comm.consecutive_groups(None);"
            "print(comm.rank(), comm.size(), comm.allreduce(torch.ones(2), 'mean').tolist(), g.size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "0 1 [1.0, 1.0] 1"


def test_horovod_defaults_follow_the_controller_and_the_device():
    from hvdet.comm.horovod_env import horovod_defaults

    gloo = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_CONTROLLER": "gloo"}
    assert horovod_defaults(gloo, cuda=False) == {"HOROVOD_CYCLE_TIME": "20", "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert horovod_defaults({"HOROVOD_CONTROLLER": "gloo"}, cuda=False)["HOROVOD_CYCLE_TIME"] == "20"
    for mpi in ({}, {"OMPI_COMM_WORLD_SIZE": "2"}, {"HOROVOD_CONTROLLER": "mpi"}):
        assert horovod_defaults(mpi, cuda=False) == {"HOROVOD_CYCLE_TIME": "5", "OMPI_MCA_mpi_yield_when_idle": "1"}
    assert horovod_defaults(gloo, cuda=True) == {"HOROVOD_CYCLE_TIME": "5"}  # NCCL hosts: no MPI yield
    # Elastic: no response cache (Horovod keeps it through a re-init; a joining rank's is empty)
    for cuda in (False, True):
        assert horovod_defaults({**gloo, "HOROVOD_ELASTIC": "1"}, cuda=cuda)["HOROVOD_CACHE_CAPACITY"] == "0"
        assert "HOROVOD_CACHE_CAPACITY" not in horovod_defaults(gloo, cuda=cuda)


@pytest.mark.slow
def test_a_users_horovod_setting_wins():
    code = ("import os; os.environ['HOROVOD_CYCLE_TIME'] = '7'; from hvdet import comm; comm.init();"
            "print(os.environ['HOROVOD_CYCLE_TIME'], os.environ.get('OMPI_MCA_mpi_yield_when_idle'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "7 1"


def test_group_size_must_divide_world():
    from hvdet import comm

    comm.init()
    with pytest.raises(ValueError, match="divide the world size"):
        comm.consecutive_groups(3 if comm.size() != 3 else 2)


@pytest.mark.parametrize("fake,message", [
    ("raise ImportError('No module named horovod')", "not installed"),
    ("__version__ = '0.28.1'", "built without PyTorch"),
])
@pytest.mark.slow  # each starts a Python that imports torch: ~5 s
def test_broken_horovod_says_what_to_run(tmp_path, fake, message):
    """Without a working Horovod one plain process still runs and trains (a world of one: the
    optimizer is not wrapped); a launched job raises with the cause and the command that fixes it."""
    pkg = tmp_path / "horovod"
    (pkg / "torch").mkdir(parents=True)
    (pkg / "__init__.py").write_text(fake + "\n")
    (pkg / "torch" / "__init__.py").write_text("raise ImportError('mpi_lib_v2.so: undefined symbol')\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    plain = ("import torch; from hvdet import comm; comm.init(); g = comm.consecutive_groups(None);"
             "print(comm.size(), g.allgather(torch.ones(2)).shape[0], comm.horovod_available());"
             "opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1);"
             "print(comm.distributed_optimizer(opt, []) is opt)")
    out = subprocess.run([sys.executable, "-c", plain], cwd=ROOT, capture_output=True, check=False, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "1 1 False" and lines[2] == "True"
    assert "training as one process without it" in lines[1] and message in lines[1]
    launched = subprocess.run([sys.executable, "-c", "from hvdet import comm; comm.init()"], cwd=ROOT,
                              capture_output=True, check=False, text=True, env={**env, "HOROVOD_RANK": "0"})
    assert launched.returncode != 0 and message in launched.stderr and "horovodrun/mpirun" in launched.stderr


def test_shm_names_the_rank_that_never_arrives(tmp_path):
    from hvdet.comm import shm

    seg = shm.ShmAllreduce(str(tmp_path / "seg"), 0, 3, create=True, timeout_s=0.2)
    with pytest.raises(TimeoutError, match=r"group ranks \[1, 2\] did not arrive"):
        seg.allreduce(torch.ones(4))
    with pytest.raises(ValueError, match="at most 8192 elements"):
        seg.allreduce(torch.ones(shm.CAPACITY + 1))
    with pytest.raises(OSError, match="expected"):  # a file that is not this group's segment
        (tmp_path / "other").write_bytes(b"x")
        shm.ShmAllreduce(str(tmp_path / "other"), 1, 3)


def test_shm_is_all_groups_or_none():
    """A member that cannot map its creator's file (another host, another container): no rank uses shm."""
    from hvdet.comm import shm

    # What rank 1 of a group of 2 sees: rank 0's path (not on this host), then the attach flags.
    here = shm.host_identity()
    answers = iter([[(here, "/nonexistent/hvdet-elsewhere"), (here, None)], [True, False]])
    with pytest.warns(UserWarning, match="no shared-memory group collective"):
        assert shm.open_group_segment(1, 2, lambda obj: next(answers)) is None


def test_shm_is_not_tried_across_hosts(tmp_path):
    """A creator on another host whose file this rank could open (a folder both nodes see) is not
    attached to: its stores would never arrive. No warning: spanning hosts is a normal layout."""
    import warnings

    from hvdet.comm import shm

    seg = shm.ShmAllreduce(str(tmp_path / "seg"), 0, 2, create=True)
    other_node = ("node-b", shm.host_identity()[1])
    answers = iter([[(other_node, seg.path), (shm.host_identity(), None)], [True, False]])
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shm.open_group_segment(1, 2, lambda obj: seen.append(obj) or next(answers)) is None
    assert seen[0] == (shm.host_identity(), None) and seen[1] is False

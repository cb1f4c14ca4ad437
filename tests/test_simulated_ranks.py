"""The distributed oracles in the fast loop: N = 1..4 ranks simulated as threads of one process.

tests/simulated.py runs each rank on a thread whose collectives meet the others' at a barrier, so these
need no launcher (``make test-fast`` runs them); the real-launcher tests they mirror stay in ``make test``:

* Cross-GPU BN == BatchNorm2d over the group's whole batch, forward and backward, every ``stats`` mode
  and the Triton kernels (under the interpreter, one rank per thread):
  tests/test_cgbn.py's test_two_ranks_gloo_matches_batchnorm_over_the_group and
  test_four_ranks_groups_of_two (the same case_oracle on each rank, the same check_oracle).
* AGVM's variances, lr scales and steps against the paper's equations: tests/test_agvm.py's
  test_agvm_two_ranks_horovodrun and test_agvm_four_ranks_mpirun_on_pmdlamb (SGD here).
* The loss check's agreement (one rank's NaN is every rank's divergence; one rank's stop request is
  every rank's stop): tests/test_train.py's test_divergence_stops_every_rank_with_the_iteration and the
  preemption vote of tests/test_faults.py's test_preemption_checkpoints_every_rank_and_resumes_exactly.
"""
import math

import pytest
import torch

from hvdet import comm
from hvdet.models.rcnn import MODULES as RCNN
from hvdet.nn.cross_gpu_bn import STATS, CrossGPUBatchNorm2d
from hvdet.ops.triton_support import interpreting, triton_available
from hvdet.step import DivergenceError, StepSettings, check_losses, grad_scaler, train_step
from tests import test_agvm as agvm_cases
from tests.simulated import RankAborted, run_in_threads, serialize_triton_launches
from tests.test_cgbn import C, case_oracle, check_oracle
from tests.test_step import Regressor, batch

RANKS = [1, 2, 3, 4]
# Images, height, width per rank: different counts, and an empty rank from 3 ranks on.
SHAPES = {1: [(3, 4, 5)], 2: [(3, 5, 7), (1, 4, 6)], 3: [(2, 4, 5), (0, 4, 5), (1, 6, 3)],
          4: [(2, 4, 4), (1, 6, 5), (0, 4, 4), (3, 3, 3)]}


# ---------------------------------------------------------------------------------------------
# The simulator itself
# ---------------------------------------------------------------------------------------------

def test_collectives_reduce_in_rank_order_and_every_rank_gets_the_same_bits():
    def case(w):
        x = torch.tensor([w.rank() + 0.1, -2.0 * w.rank()], dtype=torch.float64)
        pair = w.consecutive_groups(2)
        return {op: w.allreduce(x, op) for op in ("sum", "mean", "max", "min")} | {
            "gather": w.consecutive_groups(None).allgather(x), "pair": pair.allreduce(x), "pair_rank": pair.rank}

    results = run_in_threads(case, 4)
    xs = torch.tensor([[r + 0.1, -2.0 * r] for r in range(4)], dtype=torch.float64)
    want = {"sum": xs[0] + xs[1] + xs[2] + xs[3], "max": xs.max(0).values, "min": xs.min(0).values, "gather": xs}
    want["mean"] = want["sum"] / 4
    for r, got in enumerate(results):
        for key, value in want.items():
            assert torch.equal(got[key], value), (r, key)
        assert torch.equal(got["pair"], xs[r // 2 * 2] + xs[r // 2 * 2 + 1]) and got["pair_rank"] == r % 2
    assert comm.groups.simulated() is None  # nothing leaks to the calling thread
    assert isinstance(comm.consecutive_groups(None), comm.Group)


def test_a_failing_rank_releases_the_others_and_its_error_is_raised():
    def case(w):
        if w.rank() == 1:
            raise KeyError("rank 1's own error")
        return w.allreduce(torch.ones(1))  # would wait for rank 1 forever (here: the 30 s timeout)

    with pytest.raises(KeyError, match="rank 1's own error") as info:
        run_in_threads(case, 3)
    assert "simulated rank 1 of 3" in str(info.value.__notes__)
    assert issubclass(RankAborted, RuntimeError)


def test_mismatched_or_missing_collectives_fail_instead_of_hanging():
    def mismatched(w):
        group = w.consecutive_groups(None)
        return group.allreduce(torch.ones(2)) if w.rank() == 0 else group.allgather(torch.ones(2))

    with pytest.raises(RuntimeError, match="made different collectives"):
        run_in_threads(mismatched, 2)
    with pytest.raises(RuntimeError, match=r"did not all reach allreduce within 0.5 s"):
        run_in_threads(lambda w: w.allreduce(torch.ones(1)) if w.rank() else None, 2, timeout_s=0.5)
    with pytest.raises(ValueError, match="group size 3 must be >= 1 and divide the world size 4"):
        run_in_threads(lambda w: comm.consecutive_groups(3), 4)  # production's check, on every rank


# ---------------------------------------------------------------------------------------------
# Cross-GPU BN == BatchNorm2d on the concatenated batch (tests/test_cgbn.py's oracle)
# ---------------------------------------------------------------------------------------------

def cgbn_configs(n):
    one = {"shapes": SHAPES[n], "force_group_path": n == 1}  # one rank: CGBN's own arithmetic, not torch's BN
    configs = [{**one, "stats": stats} for stats in STATS]
    configs += [{**one, "offset": 1e4},                                     # |mean| / std = 1e4: chan stays exact
                {**one, "stats": "two_pass", "momentum": None, "affine": False, "steps": 3}]
    if triton_available() and interpreting():  # the fused Triton kernels (hvdet.ops.bn_triton) under the interpreter
        configs.append({**one, "impl": "triton", "offset": 1e3})
    if n == 4:  # two groups of two, apart: group (2, 3) holds an empty rank
        configs += [{**one, "group_size": 2, "stats": stats} for stats in ("chan", "two_pass")]
    return configs


@pytest.mark.parametrize("n", RANKS)
def test_cgbn_forward_and_backward_equal_batchnorm_over_the_group(n, monkeypatch):
    configs = cgbn_configs(n)
    if any(cfg.get("impl") == "triton" for cfg in configs):
        from hvdet.ops import bn_triton
        serialize_triton_launches(monkeypatch, bn_triton)
    results = run_in_threads(lambda w: case_oracle(configs, sim=w), n)
    # Outputs, input grads, summed weight/bias grads, running stats, eval, collectives per pass.
    check_oracle(results, configs, world=n)


def test_cgbn_errors_are_raised_on_every_rank_alike():
    def case(w):
        msgs = {}
        for key, make, x in (("empty", lambda: CrossGPUBatchNorm2d(C), torch.zeros(0, C, 4, 4)),
                             ("group_size", lambda: CrossGPUBatchNorm2d(C, group_size=3), torch.ones(2, C, 2, 2))):
            try:
                make()(x)
            except ValueError as err:
                msgs[key] = str(err)
        return msgs

    for msgs in run_in_threads(case, 2):  # raised after the same collectives: nobody hangs
        assert "more than 1 value per channel" in msgs["empty"], msgs
        assert "group_size=3" in msgs["group_size"] and "divide the world size 2" in msgs["group_size"], msgs


# ---------------------------------------------------------------------------------------------
# AGVM against the paper's equations (tests/test_agvm.py's cases)
# ---------------------------------------------------------------------------------------------

def averaged(w, model):
    """Horovod's opt.synchronize() on a simulated rank: every p.grad becomes its world mean."""
    def synchronize():
        for p in model.parameters():
            p.grad = w.allreduce(p.grad, "mean")
    return synchronize


def agvm_case(w, grads=None):
    """tests/test_agvm.py's iterations; ``grads``: every rank's per-module gradients (None: the crafted ones)."""
    from hvdet.optim import build_optimizer

    model = agvm_cases.Crafted()
    opt = build_optimizer(model, "sgd", lr=agvm_cases.LR, weight_decay=0.0, momentum=0.0, per_module=True, modules=RCNN)

    def loss():  # d loss / d weight = the rank's gradient, exactly
        if grads is None:
            return model.loss(w.rank(), w.size())
        return sum((p * grads[w.rank()][m]).sum() for m, p in model.weights().items())

    out = agvm_cases.agvm_iterations(model, opt, loss, averaged(w, model))
    out["errors"] = agvm_cases.misuse_errors(agvm_cases.Crafted(), w.rank(), w.size())
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_agvm_crafted_gradients(n):
    results = run_in_threads(agvm_case, n)
    agvm_cases.check(results, n, "sgd")
    for out in results:  # both misuses raise on every rank alike
        not_captured, not_averaged = out["errors"]
        assert "before_backward(0) was not called" in not_captured
        assert "is not the mean over all ranks" in not_averaged


@pytest.mark.parametrize("n", [2, 4])
def test_agvm_random_gradients_match_the_paper(n):
    # Multiples of 1/4: the half and world means are exact in float32, so only the cosines' rounding differs.
    gen = torch.Generator().manual_seed(n)
    grads = [{m: torch.randint(-8, 9, (2,), generator=gen) / 4.0 for m in agvm_cases.HALF_MEANS} for _ in range(n)]
    # a_M, b_M: the module's mean gradient over the first and over the second half of the ranks.
    half_means = {m: [torch.stack([g[m] for g in half]).mean(0) for half in (grads[:n // 2], grads[n // 2:])]
                  for m in agvm_cases.HALF_MEANS}
    assert all(h.norm() > 0 for ab in half_means.values() for h in ab)  # the seed gives cosines, not AGVM's edge case
    want = agvm_cases.paper_schedule(half_means)
    results = run_in_threads(lambda w: agvm_case(w, grads), n)
    agvm_cases.check(results, n, "sgd", want)
    assert len({round(v, 6) for v in want[0].values()}) == len(want[0])  # four different variances, four scales


# ---------------------------------------------------------------------------------------------
# The loss check's agreement (hvdet.step.check_losses through comm.allreduce_small)
# ---------------------------------------------------------------------------------------------

def losses_of(rank, bad=None):
    return {"cls": torch.tensor(0.5 + rank), "box": torch.tensor(math.nan if rank == bad else 0.25 * rank)}


@pytest.mark.parametrize("n", RANKS)
def test_one_ranks_nonfinite_loss_is_every_ranks_divergence(n):
    models = [Regressor() for _ in range(n)]  # built here: Regressor seeds torch's global RNG
    sgd = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]

    def diverge(w, bad):
        images, targets = batch(w.rank())
        if w.rank() == bad:
            targets[0]["y"] = torch.tensor(math.nan)
        try:
            train_step(models[w.rank()], sgd[w.rank()], grad_scaler(None, torch.device("cpu")),
                       iter([(images, targets)]), StepSettings(device=torch.device("cpu")), step=6, lr=0.1)
        except DivergenceError as err:
            return str(err)
        return None

    for bad in range(n):
        checks = run_in_threads(lambda w, bad=bad: check_losses(losses_of(w.rank(), bad)), n)
        assert not any(c.finite for c in checks) and all(math.isnan(c.mean[1]) for c in checks), bad
        messages = run_in_threads(lambda w, bad=bad: diverge(w, bad), n)
        assert all(m is not None and "diverged at iteration 7 (lr 0.1)" in m for m in messages), (bad, messages)


@pytest.mark.parametrize("n", RANKS)
def test_the_stop_vote_and_the_mean_losses_are_agreed_on_every_rank(n):
    want_mean = torch.stack([torch.stack(list(losses_of(r).values())) for r in range(n)]).mean(0)
    for requester in [None, *range(n)]:
        checks = run_in_threads(lambda w, q=requester: check_losses(losses_of(w.rank()), w.rank() == q), n)
        assert [c.stop_agreed for c in checks] == [requester is not None] * n, requester
        assert all(c.finite and torch.equal(c.mean, checks[0].mean) for c in checks)  # the same bits everywhere
        torch.testing.assert_close(checks[0].mean, want_mean)
    models = [Regressor() for _ in range(n)]

    def step(w):
        opt = torch.optim.SGD(models[w.rank()].parameters(), lr=0.1)
        return train_step(models[w.rank()], opt, grad_scaler(None, torch.device("cpu")), iter([batch(w.rank())]),
                          StepSettings(device=torch.device("cpu")), step=0, lr=0.1, stop_requested=w.rank() == n - 1)

    results = run_in_threads(step, n)
    assert all(r.stop_agreed for r in results) and all(r.losses == results[0].losses for r in results)

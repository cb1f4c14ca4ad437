"""AGVM on 2 and 4 real ranks with crafted gradients whose variances are computed here by hand.

The same cases run in the fast loop on simulated ranks (threads): tests/test_simulated_ranks.py."""
import contextlib
import math

import pytest
import torch

from hvdet.models.rcnn import MODULES as RCNN
from tests.harness import run_ranks

# The mean gradient of each module over the first (a) and second (b) half of the ranks.
HALF_MEANS = {
    "backbone": ([1.0, 0.0], [1.0, 1.0]),   # cos = 1/sqrt(2)
    "fpn": ([1.0, 0.0], [0.0, 1.0]),        # cos = 0: variance 1, the ratio clamps at 0.5
    "rpn": ([2.0, 1.0], [2.0, 1.0]),        # equal: variance 0, the ratio clamps at 10
    "roi_box": ([1.0, 2.0], [2.0, 1.0]),    # cos = 4/5
}
NOISE = [0.5, -0.25]  # added by even and subtracted by odd ranks of a half: cancels in the half mean
LR, INTERVAL, START, ITERS = 0.1, 2, 2, 5  # due at iterations 2 and 4


def crafted_grad(module, rank, world):
    half = world // 2
    a, b = HALF_MEANS[module]
    base = torch.tensor(a if rank < half else b)
    if half == 1:
        return base
    return base + (1 if rank % 2 == 0 else -1) * torch.tensor(NOISE)


class Crafted(torch.nn.Module):
    """One (1, 2) weight per module, named as in torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.body = torch.nn.Linear(2, 1, bias=False)
        self.backbone.fpn = torch.nn.Linear(2, 1, bias=False)
        self.rpn = torch.nn.Linear(2, 1, bias=False)
        self.roi_heads = torch.nn.Module()
        self.roi_heads.box_head = torch.nn.Linear(2, 1, bias=False)
        for p in self.parameters():
            torch.nn.init.constant_(p, 1.0)

    def weights(self):
        return {"backbone": self.backbone.body.weight, "fpn": self.backbone.fpn.weight, "rpn": self.rpn.weight,
                "roi_box": self.roi_heads.box_head.weight}

    def loss(self, rank, world):
        # d loss / d w = the crafted gradient, exactly
        return sum((w * crafted_grad(m, rank, world)).sum() for m, w in self.weights().items())


def case_agvm(optimizer_name):
    from hvdet import comm
    from hvdet.optim import build_optimizer

    rank, world = comm.rank(), comm.size()
    model = Crafted()
    base = build_optimizer(model, optimizer_name, lr=LR, weight_decay=0.0, momentum=0.0, per_module=True, modules=RCNN)
    before = [p.detach().clone() for p in model.parameters()]
    comm.broadcast_optimizer_state(base)  # fresh optimizer: must not take a step
    out = {"moved_by_broadcast": any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))}
    opt = comm.distributed_optimizer(base, model.named_parameters())
    out.update(agvm_iterations(model, opt, lambda: model.loss(rank, world), opt.synchronize, opt.skip_synchronize))
    out["errors"] = misuse_errors(Crafted(), rank, world) if optimizer_name == "sgd" else []
    return out


def agvm_iterations(model, opt, loss, synchronize, no_sync=contextlib.nullcontext) -> dict:
    """ITERS iterations under AGVM: backward of ``loss()``, ``synchronize()`` (leaves the world-mean
    gradients in p.grad: Horovod's, or tests/simulated.py's ranks'), AGVM, the step at LR x lr_scale."""
    from hvdet.optim import AGVM, set_lr

    agvm = AGVM(opt, model, interval=INTERVAL, start_iter=START)
    out = {"variances": {}, "lrs": []}
    for it in range(ITERS):
        set_lr(opt, LR)
        opt.zero_grad()
        agvm.before_backward(it)
        loss().backward()
        synchronize()
        variances = agvm.after_synchronize(it)
        if variances is not None:
            out["variances"][it] = variances
        out["lrs"].append({g["name"]: g["lr"] for g in opt.param_groups})
        with no_sync():
            opt.step()
    out["weights"] = {m: w.detach().clone() for m, w in model.weights().items()}
    out["state"] = agvm.state_dict()
    return out


def misuse_errors(model, rank, world):
    """Both mistakes must raise on every rank alike (no rank left waiting in a collective).

    A fresh model: the first one's parameters carry the DistributedOptimizer's hooks."""
    from hvdet.optim import AGVM, build_optimizer

    errors = []
    # NOT wrapped: p.grad stays local
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, per_module=True, modules=RCNN)
    agvm = AGVM(opt, model, interval=1)
    for capture in (False, True):
        opt.zero_grad()
        if capture:
            agvm.before_backward(0)
        model.loss(rank, world).backward()
        try:
            agvm.after_synchronize(0)
            errors.append(None)
        except RuntimeError as err:
            errors.append(str(err))
    return errors


def expected(world):
    """Hand-computed variances, scales, lrs and final weights for SGD (lr 0.1, no momentum)."""
    var, scale, lrs, weights = paper_schedule(HALF_MEANS)
    assert var["fpn"] == 1.0 and var["rpn"] == pytest.approx(0.0, abs=1e-15)
    new = {m: target_scale(var["backbone"], v) for m, v in var.items()}
    assert new["fpn"] == math.sqrt(0.5) and new["rpn"] == math.sqrt(10.0) and new["backbone"] == 1.0
    return var, scale, lrs, weights


def paper_schedule(half_means):
    """The paper's equations (AGVM's docstring) for gradients whose module means over the first and the
    second half of the ranks are ``half_means[m]`` = (a_M, b_M) at every iteration; SGD at lr LR."""
    half_means = {m: [torch.as_tensor(h, dtype=torch.float64) for h in ab] for m, ab in half_means.items()}
    var = {m: 1.0 - float(a @ b / (a.norm() * b.norm())) for m, (a, b) in half_means.items()}  # 1 - cos(a_M, b_M)
    new = {m: target_scale(var["backbone"], v) for m, v in var.items()}
    scale = {m: 1.0 for m in var}
    lrs, weights = [], {m: torch.ones(1, 2, dtype=torch.float64) for m in var}
    for it in range(ITERS):
        if it >= START and it % INTERVAL == 0:
            scale = {m: 0.97 * scale[m] + 0.03 * new[m] for m in var}                # momentum 0.97
        lrs.append({m: LR * scale[m] for m in var})
        for m, (a, b) in half_means.items():  # the world mean of two equal halves: (a_M + b_M) / 2
            weights[m] -= LR * scale[m] * (a + b) / 2
    return var, scale, lrs, weights


def target_scale(var_backbone, var_module):
    """new_M = sqrt(clamp(var_backbone / var_M, 0.5, 10)), with upstream's +1e-6 on both."""
    return math.sqrt(min(max((var_backbone + 1e-6) / (var_module + 1e-6), 0.5), 10.0))


def check(results, world, optimizer_name, want=None):
    """Every rank's AGVM results against ``want`` (:func:`paper_schedule`'s; default the crafted gradients')."""
    var, scale, lrs, weights = want or expected(world)
    for rank, out in enumerate(results):
        assert not out.get("moved_by_broadcast"), rank  # launched ranks only (simulated ones share no broadcast)
        assert sorted(out["variances"]) == [2, 4]
        for it in (2, 4):
            for m in var:
                assert out["variances"][it][m] == pytest.approx(var[m], abs=1e-6), (rank, it, m)
        for m in var:
            assert out["state"]["scales"][m] == pytest.approx(scale[m], rel=1e-9)
        for it in range(ITERS):
            assert out["lrs"][it] == pytest.approx(lrs[it], rel=1e-9), (rank, it)
        if optimizer_name == "sgd":
            for m in var:
                torch.testing.assert_close(out["weights"][m].double(), weights[m], rtol=0, atol=1e-6)
        for m in var:  # every rank applies bitwise the same update
            assert torch.equal(out["weights"][m], results[0]["weights"][m])


def test_agvm_two_ranks_horovodrun():
    results = run_ranks("tests.test_agvm:case_agvm", np=2, launcher="horovodrun", optimizer_name="sgd")
    check(results, 2, "sgd")
    for out in results:
        not_captured, not_averaged = out["errors"]
        assert "before_backward(0) was not called" in not_captured
        assert "is not the mean over all ranks" in not_averaged and "distributed_optimizer" in not_averaged


def test_agvm_four_ranks_mpirun_on_pmdlamb():
    results = run_ranks("tests.test_agvm:case_agvm", np=4, launcher="mpirun", optimizer_name="pmdlamb")
    check(results, 4, "pmdlamb")


def test_agvm_needs_two_ranks():
    from hvdet.optim import AGVM, build_optimizer

    model = Crafted()
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, per_module=True, modules=RCNN)
    with pytest.raises(ValueError, match="at least two"):
        AGVM(opt, model)

"""hvdet.step.train_step from its parts, in one process, against a plain PyTorch loop written here.

The oracle of each test is the textbook step (zero_grad, backward of the summed losses, optional
clipping, optimizer.step at the iteration's lr), independent of hvdet's code; the world is one
process, where train_step takes a plain torch optimizer instead of Horovod's wrapper.
"""
import copy
import math

import pytest
import torch
from torch import nn

from hvdet import comm
from hvdet.step import DivergenceError, StepSettings, autocast_dtype, check_losses, grad_scaler, train_step


@pytest.fixture(autouse=True, scope="module")
def world_of_one():
    comm.init()


class Regressor(nn.Module):
    """A detector-shaped toy: (images, targets) -> a dict of losses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, images, targets):
        x = torch.stack([im.mean(dim=(1, 2)) for im in images])
        y = torch.stack([t["y"] for t in targets])
        p = self.head(torch.tanh(self.body(x))).squeeze(1)
        return {"mse": ((p - y) ** 2).mean(), "l1": (p - y).abs().mean()}


def batch(seed: int, n: int = 4, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 5, 5, generator=g) * scale for _ in range(n)]
    targets = [{"y": torch.rand((), generator=g) * 3, "image_id": i} for i in range(n)]
    return images, targets


def reference_step(model, opt, batches, lr, clip=None):
    """The textbook step: mean of the passes' summed losses, backward, clip, step at ``lr``."""
    opt.zero_grad()
    losses = [model(*b) for b in batches]
    (sum(sum(d.values()) for d in losses) / len(batches)).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return {k: sum(d[k].item() for d in losses) / len(batches) for k in losses[0]}


def pair(make_opt):
    a, b = Regressor(), Regressor()
    b.load_state_dict(a.state_dict())
    return a, make_opt(a), b, make_opt(b)


def assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name, **tol)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=123.0, momentum=0.9, weight_decay=1e-4)


def test_train_step_equals_the_textbook_step_over_iterations():
    model, opt, ref, ref_opt = pair(sgd)
    scaler = grad_scaler(None, torch.device("cpu"))
    for step in range(3):
        b = batch(step)
        lr = 0.05 * (step + 1)
        got = train_step(model, opt, scaler, iter([b]), step=step, lr=lr).losses
        want = reference_step(ref, ref_opt, [b], lr)
        assert got == pytest.approx(want, rel=1e-6)
        assert_same_params(model, ref)
        assert opt.param_groups[0]["lr"] == lr  # the step's lr, whatever the optimizer was built with


def test_backward_passes_average_their_batches():
    model, opt, ref, ref_opt = pair(sgd)
    scaler = grad_scaler(None, torch.device("cpu"))
    batches = [batch(10), batch(11, n=2)]
    got = train_step(model, opt, scaler, iter(batches), StepSettings(passes=2), step=0, lr=0.1).losses
    want = reference_step(ref, ref_opt, batches, 0.1)
    assert got == pytest.approx(want, rel=1e-6)
    assert_same_params(model, ref)


def test_gradients_are_clipped_by_their_true_norm_under_loss_scaling():
    """fp16 loss scaling (an enabled GradScaler on CPU): the scaled gradients are unscaled before
    clipping, so the step equals the unscaled textbook step with the same clipping."""
    model, opt, ref, ref_opt = pair(sgd)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    b = batch(3, scale=20.0)
    train_step(model, opt, scaler, iter([b]), StepSettings(clip_grad_norm=0.01), step=0, lr=0.1)
    reference_step(ref, ref_opt, [b], 0.1, clip=0.01)
    assert_same_params(model, ref, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**12  # finite gradients: no skip, no back-off


class Probe:
    """Stands where AGVM does and records the gradients it is shown (train_step's contract with AGVM)."""

    def __init__(self, model):
        self.model, self.before, self.seen = model, [], None

    def before_backward(self, step):
        self.before.append(step)

    def after_synchronize(self, step):
        self.seen = [p.grad.clone() for p in self.model.parameters()]


def test_agvm_sees_the_scaled_gradients_and_an_inf_skips_the_step():
    model, opt, ref, _ = pair(sgd)
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=True)
    probe = Probe(model)
    b = batch(4)
    train_step(model, opt, scaler, iter([b]), step=7, lr=0.1, agvm=probe)
    ref.zero_grad()
    sum(ref(*b).values()).backward()
    assert probe.before == [7]
    for seen, p in zip(probe.seen, ref.parameters(), strict=True):  # AGVM ran before unscale_
        torch.testing.assert_close(seen, p.grad * scale)
    # A finite loss whose scaled gradients overflow: the scaler skips the step and backs off.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, enabled=True)
    before = copy.deepcopy(model.state_dict())
    images, targets = batch(5)
    for t in targets:
        t["y"] = t["y"] + 1000.0  # gradients of ~2000 x 2**127: inf
    losses = train_step(model, opt, scaler, iter([(images, targets)]), step=8, lr=0.1).losses
    assert all(math.isfinite(v) for v in losses.values())
    assert scaler.get_scale() == 2.0**126
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_nonfinite_loss_is_a_divergence_naming_the_iteration_and_nothing_is_stepped():
    model, opt, _, _ = pair(sgd)
    images, targets = batch(6)
    targets[0]["y"] = torch.tensor(math.nan)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DivergenceError, match=r"diverged at iteration 13 \(lr 0\.25\).*mse"):
        train_step(model, opt, grad_scaler(None, torch.device("cpu")), iter([(images, targets)]), step=12, lr=0.25)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    model, opt, ref, ref_opt = pair(sgd)
    dtype = autocast_dtype(amp=True, amp_dtype="float16", amp_on_cpu=True, device=torch.device("cpu"))
    assert dtype is torch.bfloat16 and grad_scaler(dtype, torch.device("cpu")).is_enabled() is False
    b = batch(8)
    got = train_step(model, opt, grad_scaler(dtype, torch.device("cpu")), iter([b]), StepSettings(amp_dtype=dtype),
                     step=0, lr=0.1).losses
    want = reference_step(ref, ref_opt, [b], 0.1)
    assert got == pytest.approx(want, rel=2e-2)  # bf16 keeps 8 bits of mantissa
    assert_same_params(model, ref, rtol=2e-2, atol=2e-3)


def test_autocast_dtype_follows_the_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(True, "float16", False, cuda) is torch.float16
    assert autocast_dtype(True, "bfloat16", False, cuda) is torch.bfloat16
    assert autocast_dtype(False, "float16", True, cuda) is None
    assert autocast_dtype(True, "float16", False, cpu) is None  # no fast fp16 on CPUs
    assert grad_scaler(torch.float16, cpu).is_enabled() and not grad_scaler(torch.bfloat16, cpu).is_enabled()


def test_settings_come_from_the_solver_once_and_the_stop_vote_is_returned():
    from hvdet.config import Config

    solver = Config().solver
    solver.backward_passes_per_step, solver.clip_grad_norm, solver.amp, solver.amp_on_cpu = 3, 5.0, True, True
    cpu = torch.device("cpu")
    assert StepSettings.from_solver(solver, cpu) == StepSettings(3, torch.bfloat16, 5.0, cpu)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    check = check_losses(losses, stop_requested=True)  # a world of one: the mean is the rank's own
    assert check.finite and check.stop_agreed and check.mean.tolist() == [1.0, 2.0]
    assert not check_losses({"a": torch.tensor(math.inf)}).finite
    model, opt, _, _ = pair(sgd)
    result = train_step(model, opt, grad_scaler(None, cpu), iter([batch(9)]), step=0, lr=0.1, stop_requested=True)
    assert result.stop_agreed and set(result.losses) == {"mse", "l1"}
    assert not train_step(model, opt, grad_scaler(None, cpu), iter([batch(9)]), step=1, lr=0.1).stop_agreed

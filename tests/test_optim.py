"""PMD-LAMB / LAMB (C++, Triton and torch reference implementations), LARS, param groups, the optimizer factory and
diagnostics, each checked against a short reference written here from the papers' equations; LAMB and LARS also
against timm's implementations, an oracle that does not share our reading of the papers."""
import copy
import io
import itertools
import math

import pytest
import torch

from hvdet.models import module_map
from hvdet.models.rcnn import MODULES as RCNN
from hvdet.ops import lamb as ops_lamb
from hvdet.ops import lamb_cpp
from hvdet.optim import (
    LAMB,
    LARS,
    OPTIMIZERS,
    PMDLAMB,
    build_optimizer,
    param_groups,
    pmd_decay,
    summarize_by_module,
    trust_ratios,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the machine's two cores are shared with other test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Reference PMD-LAMB: LargeDet Algorithm 1, one tensor at a time, in float64.
# ---------------------------------------------------------------------------------------------


def reference_pmdlamb(params, grad_steps, groups, max_grad_norm=None):
    """params: list of tensors; grad_steps: per step, a list of gradients (None: no grad);
    groups: per tensor a dict(lr, betas, eps, wd, alpha, T, trust, bias_correction)."""
    x = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.zeros_like(t) for t in x]
    t_of = [0] * len(x)
    for grads in grad_steps:
        gs = [None if g is None else g.double() for g in grads]
        if max_grad_norm is not None:
            total = math.sqrt(sum(float((g ** 2).sum()) for g in gs if g is not None))
            gs = [None if g is None else g * (max_grad_norm / max(total, max_grad_norm)) for g in gs]
        for i, g in enumerate(gs):
            if g is None:
                continue
            o = groups[i]
            b1, b2 = o["betas"]
            t_of[i] += 1
            t = t_of[i]
            xi = 1.0 if o["T"] is None else math.cos(math.pi / 2 * (t % o["T"]) / o["T"])
            m[i] = xi * b1 * m[i] + (1 - b1) * g
            v[i] = xi * b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = (m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)) if o["bias_correction"] else (m[i], v[i])
            r = m_hat / (v_hat.sqrt() + o["eps"])
            u = r + o["wd"] * x[i]
            x_norm, u_norm = float(x[i].norm()), float(u.norm())
            phi = x_norm / u_norm if o["trust"] and x_norm > 0 and u_norm > 0 else 1.0
            x[i] = x[i] - o["lr"] * o["alpha"] * phi * u
    return x


SHAPES = [(), (7,), (0,), (33, 17), (3, 5, 2, 2), (70001,)]  # scalar, vector, empty, matrix, conv, multi-chunk


def make_problem(seed=0, steps=60, grad_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    params.append(torch.zeros(4, 3))  # ||x|| = 0 -> phi = 1
    params.append(torch.randn(6, generator=gen))  # its gradient is always zero
    grad_steps = []
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(grad_dtype) for p in params]
        grads[-1] = torch.zeros(6, dtype=grad_dtype)
        if step % 5 == 3:
            grads[1] = None  # a tensor without a gradient this step: skipped, its step count does not advance
        grad_steps.append(grads)
    return params, grad_steps


def run_optimizer(opt_factory, params, grad_steps):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    if grad_steps[0][0].dtype != ps[0].dtype:
        for p in ps:
            p.grad_dtype = None  # torch >= 2.10 otherwise refuses a gradient of another dtype
    opt = opt_factory(ps)
    for grads in grad_steps:
        for p, g in zip(ps, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return ps, opt


CONFIGS = {
    "pmdlamb_T7": {"cycle_length": 7},  # more than 8 full cycles in 60 steps
    "lamb": {"cycle_length": None},
    "bias_correction_clip": {"cycle_length": 5, "bias_correction": True, "max_grad_norm": 3.0},
    "defaults": {},
}


def split_groups(ps, lr, **kw):
    """Two groups: trust-ratio weights, and 1-d tensors without trust ratio or weight decay, other lr."""
    one_d = [p for p in ps if p.ndim <= 1]
    rest = [p for p in ps if p.ndim > 1]
    return PMDLAMB([{"params": rest}, {"params": one_d, "weight_decay": 0.0, "trust": False, "lr": lr * 0.5}],
                   lr=lr, alpha=0.05, **kw)


def ref_groups(params, lr, cycle_length=200, bias_correction=False, max_grad_norm=None):
    base = {"betas": (0.9, 0.999), "eps": 1e-6, "alpha": 0.05, "T": cycle_length, "bias_correction": bias_correction}
    return [{**base, "lr": lr * 0.5, "wd": 0.0, "trust": False} if p.ndim <= 1
            else {**base, "lr": lr, "wd": 5e-4, "trust": True} for p in params]


# triton runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), 10 s a config: two configs cover it, outside
# the fast loop (tests/test_ops.py checks the Triton kernels on small tensors there).
@pytest.mark.parametrize(("impl", "config"), [(i, c) for i in ("cpp", "reference") for c in CONFIGS]
                         + [pytest.param("triton", c, marks=pytest.mark.slow)
                            for c in ("pmdlamb_T7", "bias_correction_clip")])
def test_fused_matches_reference_loop(impl, config, monkeypatch):
    kw = CONFIGS[config]
    monkeypatch.setattr(lamb_cpp, "BLOCK_ELEMS", 4096)  # many blocks, and tensors larger than a block
    params, grad_steps = make_problem(seed=list(CONFIGS).index(config))
    got, opt = run_optimizer(lambda ps: split_groups(ps, 0.5, impl=impl, **kw), params, grad_steps)
    want = reference_pmdlamb(params, grad_steps, ref_groups(params, 0.5, **kw),
                             max_grad_norm=kw.get("max_grad_norm"))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g.detach().double(), w, rtol=2e-5, atol=2e-6, msg=f"tensor {i} {tuple(g.shape)}")
    assert opt.state[got[1]]["step"] == 60 - 12  # skipped on every 5th step from step 3
    assert not torch.equal(got[0], params[0])   # the scalar moved


def test_kernel_is_used_and_agrees_with_foreach_on_mixed_tensors():
    """auto: contiguous fp32 CPU tensors go to the kernel in one call, the rest (channels_last) to foreach."""
    assert lamb_cpp.kernel_available(), "the C++ kernel did not build: run python -m hvdet.ops.lamb_cpp --build"
    conv = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    params, grad_steps = make_problem(steps=12)
    params = params + [conv]
    grad_steps = [grads + [torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)] for grads in grad_steps]
    calls = []
    real = lamb_cpp._kernel.lamb_step
    fake = type("K", (), {"lamb_step": staticmethod(lambda *a: calls.append(len(a[0])) or real(*a))})
    saved, lamb_cpp._kernel = lamb_cpp._kernel, fake
    try:
        auto, _ = run_optimizer(lambda ps: PMDLAMB(ps, lr=0.3, cycle_length=4), params, grad_steps)
    finally:
        lamb_cpp._kernel = saved
    ref, _ = run_optimizer(lambda ps: PMDLAMB(ps, lr=0.3, cycle_length=4, impl="reference"), params, grad_steps)
    assert len(calls) == 12 and set(calls) <= {len(params) - 1, len(params) - 2}  # one call per step
    for a, b in zip(auto, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_result_does_not_depend_on_the_thread_count(monkeypatch):
    """Per-chunk partial norms summed in a fixed order: 1 and 2 threads agree bitwise."""
    monkeypatch.setattr(lamb_cpp, "BLOCK_ELEMS", 100_000)
    params, grad_steps = make_problem(steps=5)
    params.append(torch.randn(300_000))  # several 64K chunks: both threads get work
    grad_steps = [grads + [torch.randn(300_000)] for grads in grad_steps]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            got, _ = run_optimizer(lambda ps: PMDLAMB(ps, lr=0.3, cycle_length=3, impl="cpp"), params, grad_steps)
        finally:
            torch.set_num_threads(1)
        results.append(got)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_half_precision_gradients_take_the_foreach_path():
    params, grad_steps = make_problem(steps=20, grad_dtype=torch.bfloat16)
    got, _ = run_optimizer(lambda ps: PMDLAMB(ps, lr=0.2, cycle_length=6), params, grad_steps)
    groups = [{"lr": 0.2, "betas": (0.9, 0.999), "eps": 1e-6, "wd": 5e-4, "alpha": 0.012, "T": 6, "trust": True,
               "bias_correction": False}] * len(params)
    want = reference_pmdlamb(params, grad_steps, groups)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach().double(), w, rtol=2e-5, atol=2e-6)


def test_pmd_decay_over_a_cycle():
    assert pmd_decay(200, 200) == 1.0 and pmd_decay(400, 200) == 1.0  # t mod T = 0 restarts the cycle
    assert pmd_decay(100, 200) == pytest.approx(math.sqrt(0.5), abs=1e-15)
    assert pmd_decay(1, 200) == pytest.approx(math.cos(math.pi / 400), abs=1e-15)
    assert pmd_decay(199, 200) == pytest.approx(math.cos(math.pi / 2 * 0.995), abs=1e-15)
    assert pmd_decay(201, 200) == pmd_decay(1, 200)
    values = [pmd_decay(t, 200) for t in range(200, 400)]
    assert all(a > b for a, b in itertools.pairwise(values))  # decays from 1 towards 0 within a cycle
    assert all(pmd_decay(t, None) == 1.0 for t in (1, 200, 12345))


def test_state_dict_round_trip_continues_identically():
    params, grad_steps = make_problem(steps=30)
    first, second = grad_steps[:15], grad_steps[15:]
    ps, opt = run_optimizer(lambda p: split_groups(p, 0.4, cycle_length=9, max_grad_norm=5.0), params, first)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [torch.nn.Parameter(p) for p in saved["params"]]
    opt2 = split_groups(resumed, 0.4, cycle_length=9, max_grad_norm=5.0)
    opt2.load_state_dict(saved["opt"])
    for live, again in ((ps, opt), (resumed, opt2)):
        for grads in second:
            for p, g in zip(live, grads, strict=True):
                p.grad = None if g is None else g.clone()
            again.step()
    for a, b in zip(ps, resumed, strict=True):
        assert torch.equal(a, b)
    assert opt2.state[resumed[0]]["step"] == 30


def test_state_exists_before_the_first_step():
    """So Horovod's broadcast_optimizer_state sends it instead of taking a zero-gradient step."""
    p = torch.nn.Parameter(torch.ones(3))
    for opt in (PMDLAMB([p], lr=0.1), LAMB([p], lr=0.1), LARS([p], lr=0.1)):
        assert len(opt.state_dict()["state"]) == 1


def test_options_survive_a_rebuild_from_param_groups():
    """Horovod's DistributedOptimizer re-creates the optimizer as cls(param_groups): nothing may be lost."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([p], lr=0.1, max_grad_norm=2.0, bias_correction=True, impl="reference")
    again = LAMB(opt.param_groups)
    g = again.param_groups[0]
    assert (g["lr"], g["max_grad_norm"], g["bias_correction"], g["impl"], g["cycle_length"]) == (
        0.1, 2.0, True, "reference", None)


# ---------------------------------------------------------------------------------------------
# LARS against its equations
# ---------------------------------------------------------------------------------------------


def test_lars_matches_reference_loop():
    params, grad_steps = make_problem(steps=25)
    grad_steps = [[g if g is not None else torch.zeros(p.shape) for g, p in zip(gs, params, strict=True)]
                  for gs in grad_steps]
    lr, mom, wd, eta, eps = 0.5, 0.9, 1e-3, 0.01, 1e-8

    def factory(ps):
        return LARS([{"params": [p for p in ps if p.ndim > 1]},
                     {"params": [p for p in ps if p.ndim <= 1], "trust": False, "weight_decay": 0.0}],
                    lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=eps)
    got, _ = run_optimizer(factory, params, grad_steps)
    x = [p.double().clone() for p in params]
    buf = [torch.zeros_like(t) for t in x]
    for grads in grad_steps:
        for i, g in enumerate(grads):
            g = g.double()
            trust, beta = x[i].ndim > 1, (wd if x[i].ndim > 1 else 0.0)
            w_norm, g_norm = float(x[i].norm()), float(g.norm())
            local = eta * w_norm / (g_norm + beta * w_norm + eps) if trust and w_norm > 0 and g_norm > 0 else 1.0
            buf[i] = mom * buf[i] + lr * local * (g + beta * x[i])
            x[i] = x[i] - buf[i]
    # fp32 against fp64: the 1-d tensors are plain momentum SGD and grow to |x| ~ 10
    for g, w in zip(got, x, strict=True):
        torch.testing.assert_close(g.detach().double(), w, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Param groups, factory, diagnostics
# ---------------------------------------------------------------------------------------------


class TinyDetector(torch.nn.Module):
    """Parameter names like torchvision's detectors, sized for a test."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh())
        self.backbone.fpn = torch.nn.Linear(16, 16)
        self.rpn = torch.nn.Module()
        self.rpn.head = torch.nn.Linear(16, 8)
        self.roi_heads = torch.nn.Module()
        self.roi_heads.box_head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.backbone.body(x)
        h = h + torch.tanh(self.backbone.fpn(h))
        return self.roi_heads.box_head(torch.tanh(self.rpn.head(h)))


# ---------------------------------------------------------------------------------------------
# A second, independent oracle: timm's Lamb and Lars (timm 1.0.31, not written from our reading)
# ---------------------------------------------------------------------------------------------


def timm_oracle_problem(zero_bias=False):
    """TinyDetector on a fixed regression task; every parameter gets a gradient at every step."""
    torch.manual_seed(0)
    model = TinyDetector()
    if zero_bias:  # ||x|| = 0 at the first step: trust ratio 1 in both
        with torch.no_grad():
            model.backbone.fpn.bias.zero_()
    x = torch.randn(32, 6)
    y = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())(x).detach()
    return model, x, y


def train_both(ours, theirs, make_ours, make_theirs, x, y, steps):
    """The same loss on two copies of the model, one step of each optimizer per iteration; returns the first
    step's global gradient norm. Each copy computes its own gradients, so a difference would compound."""
    opt_ours, opt_theirs = make_ours(ours), make_theirs(theirs)
    first_grad_norm = None
    for _ in range(steps):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if first_grad_norm is None:
                first_grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in model.parameters()])))
            opt.step()
    return first_grad_norm


def decay_and_rest(model):
    """Matrices (weight decay, trust ratio) and 1-d tensors (neither), as hvdet.optim.param_groups splits them."""
    params = list(model.parameters())
    return [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]


# Each case: hvdet's param groups and options, and the timm settings with the same semantics (see below).
TIMM_LAMB_CASES = {
    # The usual split: weights with decay and trust ratio; biases and norms without either, at half the lr.
    "decay_and_no_decay": {"bias_correction": False, "max_grad_norm": None, "trust_without_decay": False},
    # Apex's options: bias-corrected moments, and a max_grad_norm below the gradient norm, so the clip acts.
    "bias_correction_and_clip": {"bias_correction": True, "max_grad_norm": 0.05, "trust_without_decay": False},
    # Trust ratio on every tensor, no weight decay anywhere (timm: always_adapt), a zero-norm tensor included.
    "trust_without_decay": {"bias_correction": False, "max_grad_norm": None, "trust_without_decay": True},
}
LAMB_FLAVOURS = {
    "LAMB": lambda groups, **kw: LAMB(groups, **kw),
    "PMDLAMB_T_None": lambda groups, **kw: PMDLAMB(groups, cycle_length=None, **kw),
    "PMDLAMB_T_1": lambda groups, **kw: PMDLAMB(groups, cycle_length=1, **kw),  # xi = cos(0) = 1 at every step
}


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("flavour", LAMB_FLAVOURS)
@pytest.mark.parametrize("case", TIMM_LAMB_CASES)
def test_lamb_matches_timm_lamb(case, flavour, impl):
    """hvdet's LAMB (and PMD-LAMB without moment decay) against ``timm.optim.Lamb`` over 12 steps.

    timm reproduces hvdet's update exactly when configured as below; the remaining differences are:

    * alpha: hvdet steps by ``lr * alpha * phi * u`` (LargeDet's trust-ratio scale), timm by ``lr * phi * u``:
      timm's lr is hvdet's ``lr * alpha`` per group, which is exact.
    * the trust-ratio switch: hvdet has a per-group ``trust`` flag; timm applies phi iff the group's
      ``weight_decay != 0 or always_adapt``. So hvdet ``trust=True`` is timm with decay or ``always_adapt=True``,
      and hvdet ``trust=False, weight_decay=0`` is timm with ``weight_decay=0, always_adapt=False``. No timm
      setting gives hvdet's ``trust=False`` with ``weight_decay > 0`` (timm would apply phi); hvdet's
      param_groups never builds that group, and it is not compared here.
    * the step count t (bias correction): hvdet counts per tensor (a tensor without a gradient does not
      advance), timm per group (every ``step()`` advances all of it). They agree when every tensor has a
      gradient at every step, as here; the per-tensor count is checked against the reference loop above.
    * defaults: timm has ``bias_correction=True``, ``max_grad_norm=1.0``, ``weight_decay=0.01``; hvdet has
      False, None, 5e-4. All are set explicitly. timm reads ``max_grad_norm`` from its defaults only, hvdet
      requires one value in every group; both scale g by max / max(||g||_global, max) before the moments.
    * eps: both use ``m_hat / (sqrt(v_hat) + eps)`` (timm's multi-tensor path folds the bias corrections
      into ``eps * sqrt(1 - beta2^t)``, equal in exact arithmetic), and phi = 1 where ||x|| or ||u|| is 0.
    * PMD-LAMB's decay xi < 1 has no timm counterpart: only ``cycle_length=None`` and ``cycle_length=1``
      (xi = cos(0) = 1 at every t) are LAMB and compared.
    """
    from timm.optim import Lamb

    options = TIMM_LAMB_CASES[case]
    lr, alpha, wd, betas, eps = 0.6, 0.05, 1e-2, (0.9, 0.999), 1e-6
    ours, x, y = timm_oracle_problem(zero_bias=options["trust_without_decay"])
    theirs = copy.deepcopy(ours)

    def make_ours(model):
        kw = {"lr": lr, "alpha": alpha, "betas": betas, "eps": eps, "bias_correction": options["bias_correction"],
              "max_grad_norm": options["max_grad_norm"], "impl": impl}
        if options["trust_without_decay"]:
            return LAMB_FLAVOURS[flavour]([{"params": list(model.parameters()), "weight_decay": 0.0}], **kw)
        decay, rest = decay_and_rest(model)
        return LAMB_FLAVOURS[flavour]([{"params": decay, "weight_decay": wd},
                                       {"params": rest, "weight_decay": 0.0, "trust": False, "lr": lr / 2}], **kw)

    def make_theirs(model):
        kw = {"lr": lr * alpha, "betas": betas, "eps": eps, "bias_correction": options["bias_correction"],
              "max_grad_norm": options["max_grad_norm"], "grad_averaging": True, "trust_clip": False}
        if options["trust_without_decay"]:
            return Lamb(model.parameters(), weight_decay=0.0, always_adapt=True, **kw)
        decay, rest = decay_and_rest(model)
        return Lamb([{"params": decay, "weight_decay": wd},
                     {"params": rest, "weight_decay": 0.0, "lr": lr / 2 * alpha}], always_adapt=False, **kw)

    start = [p.detach().clone() for p in ours.parameters()]
    first_grad_norm = train_both(ours, theirs, make_ours, make_theirs, x, y, steps=12)
    if options["max_grad_norm"] is not None:
        assert first_grad_norm > options["max_grad_norm"]  # the clip acted
    for (name, a), b, p0 in zip(ours.named_parameters(), theirs.parameters(), start, strict=True):
        assert not torch.equal(a, p0), f"{name} did not move"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}")


@pytest.mark.parametrize("trust_without_decay", [False, True])
def test_lars_matches_timm_lars(trust_without_decay):
    """hvdet's LARS against ``timm.optim.Lars`` over 12 steps, at a constant learning rate.

    The same trust ratio eta * ||w|| / (||g|| + wd * ||w|| + eps) (1 where ||w|| or ||g|| is 0), and the same
    switch as LAMB's (timm adapts iff ``weight_decay != 0 or always_adapt``; hvdet by its ``trust`` flag).
    The one difference no timm setting removes is where the learning rate enters: hvdet follows the LARS
    paper (Algorithm 1), ``v = m * v + lr * local_lr * (g + wd * w); w -= v``, timm follows torch.optim.SGD,
    ``b = m * b + local_lr * (g + wd * w); w -= lr * b``. So v = lr * b while lr is constant, and the
    updates agree; after an lr change hvdet's momentum still carries the old lr and timm's does not, so a
    schedule is not compared. timm: dampening 0, no Nesterov, no LARC clipping (``trust_clip=False``).
    """
    from timm.optim import Lars

    lr, momentum, wd, eta, eps = 1.5, 0.9, 1e-3, 0.02, 1e-8
    ours, x, y = timm_oracle_problem(zero_bias=trust_without_decay)
    theirs = copy.deepcopy(ours)
    common = {"lr": lr, "momentum": momentum, "eps": eps}

    def make_ours(model):
        if trust_without_decay:
            return LARS(model.parameters(), weight_decay=0.0, trust_coefficient=eta, **common)
        decay, rest = decay_and_rest(model)
        return LARS([{"params": decay}, {"params": rest, "trust": False, "weight_decay": 0.0}],
                    weight_decay=wd, trust_coefficient=eta, **common)

    def make_theirs(model):
        kw = {"trust_coeff": eta, "dampening": 0.0, "nesterov": False, "trust_clip": False, **common}
        if trust_without_decay:
            return Lars(model.parameters(), weight_decay=0.0, always_adapt=True, **kw)
        decay, rest = decay_and_rest(model)
        return Lars([{"params": decay}, {"params": rest, "weight_decay": 0.0}], weight_decay=wd, always_adapt=False,
                    **kw)

    start = [p.detach().clone() for p in ours.parameters()]
    train_both(ours, theirs, make_ours, make_theirs, x, y, steps=12)
    for (name, a), b, p0 in zip(ours.named_parameters(), theirs.parameters(), start, strict=True):
        assert not torch.equal(a, p0), f"{name} did not move"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}")


LRS = {"sgd": 0.05, "adam": 0.01, "adamw": 0.01, "lamb": 1.0, "pmdlamb": 1.0, "lars": 2.0}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(name):
    torch.manual_seed(0)
    model = TinyDetector()
    x = torch.randn(64, 6)
    y = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())(x).detach()
    opt = build_optimizer(model, name, lr=LRS[name], weight_decay=1e-4, per_module=True, modules=RCNN)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"{name}: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_build_optimizer_rejects_unknown_names():
    # The name given and the choices, in whatever order the message puts them.
    with pytest.raises(ValueError, match=r"(?=.*optimizer)(?=.*'adamx')(?=.*pmdlamb)"):
        build_optimizer(TinyDetector(), "adamx", lr=0.1, weight_decay=0.0)


def test_param_groups_of_a_torchvision_mask_rcnn():
    import torchvision

    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert module_map("maskrcnn_resnet50_fpn") is RCNN
    modules = {RCNN.module_of(n) for n in names}
    assert modules == {"backbone", "fpn", "rpn", "roi_box", "roi_mask"}
    assert RCNN.module_of("backbone.fpn.inner_blocks.0.0.weight") == "fpn"
    assert RCNN.module_of("module.roi_heads.mask_predictor.mask_fcn_logits.bias") == "roi_mask"
    assert RCNN.module_of("roi_heads.keypoint_head.0.weight") == "other"
    groups = param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0, per_module=True, modules=RCNN)
    assert [g["name"] for g in groups] == ["backbone", "backbone.no_decay", "fpn", "fpn.no_decay", "rpn",
                                           "rpn.no_decay", "roi_box", "roi_box.no_decay", "roi_mask",
                                           "roi_mask.no_decay"]
    by_id = {id(p): n for n, p in names.items()}
    seen = [by_id[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names)  # every trainable parameter exactly once
    for g in groups:
        assert g["lr_scale"] == 1.0 and all(RCNN.module_of(by_id[id(p)]) == g["module"] for p in g["params"])
        no_decay = g["name"].endswith("no_decay")
        assert g["trust"] is not no_decay and g["weight_decay"] == (0.0 if no_decay else 1e-4)  # Apex's exclusion
        assert all((p.ndim <= 1) == no_decay for p in g["params"])
    algorithm_1 = param_groups(model, weight_decay=1e-4, per_module=True, norm_bias_trust=True, modules=RCNN)
    assert all(g["trust"] for g in algorithm_1)  # Algorithm 1: every tensor under the trust ratio
    flat = param_groups(model, weight_decay=1e-4)
    assert [(g["name"], g["module"]) for g in flat] == [("default", "all"), ("no_decay", "all")]


def test_module_maps_are_the_families_and_checked():
    from hvdet.optim import ModuleMap

    with pytest.raises(ValueError, match="per_module=True needs the model's ModuleMap"):
        param_groups(TinyDetector(), 1e-4, per_module=True)
    with pytest.raises(ValueError, match=r"missing \['head'\]"):
        ModuleMap(prefixes=(("a.", "body"), ("b.", "head")), order=("body",))
    assert ModuleMap((("a.", "body"),), ("body",)).module_of("_orig_mod.module.a.w") == "body"  # wrappers stripped
    assert module_map("retinanet_resnet50_fpn").modules == ("backbone", "fpn", "head_cls", "head_reg", "other")


def test_trust_ratios_and_module_summary():
    torch.manual_seed(0)
    model = TinyDetector()
    model(torch.randn(4, 6)).sum().backward()
    model.backbone.fpn.bias.grad.zero_()
    ratios = trust_ratios(model)
    for n, p in model.named_parameters():
        w_norm, g_norm = float(p.detach().norm()), float(p.grad.norm())
        want = w_norm / g_norm if g_norm > 0 else float("inf")
        assert ratios[n] == pytest.approx(want, rel=1e-6)
    summary = summarize_by_module(ratios, RCNN)
    assert set(summary) == {"backbone", "fpn", "rpn", "roi_box"}
    assert summary["fpn"]["max"] == float("inf")
    assert summary["backbone"]["min"] <= summary["backbone"]["median"] <= summary["backbone"]["max"]


def test_bad_arguments_say_what_is_wrong():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="cycle_length"):
        PMDLAMB([p], lr=0.1, cycle_length=0)
    with pytest.raises(ValueError, match="betas"):
        PMDLAMB([p], lr=0.1, betas=(0.9, 1.0))
    opt = PMDLAMB([{"params": [p], "max_grad_norm": 1.0}, {"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1)
    for q in (p, opt.param_groups[1]["params"][0]):
        q.grad = torch.ones_like(q)
    with pytest.raises(ValueError, match="same in every param group"):
        opt.step()
    r = torch.nn.Parameter(torch.ones(2))
    opt = PMDLAMB([r], lr=0.1, max_grad_norm=1.0)
    r.grad = torch.tensor([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match="step 1: .* NaN or inf gradient"):
        opt.step()
    assert opt.state[r]["step"] == 0 and torch.equal(r.detach(), torch.ones(2))  # nothing changed
    q = torch.nn.Parameter(torch.ones(4, 4))
    q.grad = torch.ones(4, 4).t()  # not contiguous: the kernel alone cannot take it... but auto copies it
    PMDLAMB([q], lr=0.1).step()
    with pytest.raises(ValueError, match="impl='cpp' does not take .*contiguous: False"):
        ops_lamb.lamb_step([q.detach().t()], [q.grad], [torch.zeros(4, 4)], [torch.zeros(4, 4)],
                           torch.zeros(1, len(ops_lamb.COEFS), dtype=torch.float64), impl="cpp")


# ---------------------------------------------------------------------------------------------
# The mechanisms of issue 20: norm/bias tensors under the trust ratio, bias correction
# ---------------------------------------------------------------------------------------------


class ConvBN(torch.nn.Module):
    """A conv + BN + linear net with torchvision-like names: conv weights, BN scales/shifts, a bias."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.BatchNorm2d(6),
                                                 torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.rpn = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.rpn(self.backbone.body(x))


@pytest.mark.parametrize("norm_bias_trust", [True, False])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_whole_model_step_is_algorithm_1_in_float64(norm_bias_trust, bias_correction):
    """build_optimizer's PMD-LAMB over a conv+BN net == LargeDet Algorithm 1 read in float64, one tensor at a
    time: with norm_bias_trust every tensor (BN gamma/beta, biases) takes the trust ratio and, with
    norm_weight_decay = weight_decay, the same decay, exactly as Algorithm 1 (which excludes nothing); without
    it, Apex's exclusion. Bias correction on and off."""
    torch.manual_seed(0)
    model = ConvBN()
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, "pmdlamb", lr=0.5, weight_decay=5e-4, norm_weight_decay=5e-4, alpha=0.05,
                          cycle_length=4, bias_correction=bias_correction, norm_bias_trust=norm_bias_trust)
    gen = torch.Generator().manual_seed(1)
    grad_steps = []
    for _ in range(9):  # two full PMD cycles and a bit
        x, y = torch.randn(8, 3, 5, 5, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad_steps.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    groups = [{"lr": 0.5, "betas": (0.9, 0.999), "eps": 1e-6, "wd": 5e-4, "alpha": 0.05, "T": 4,
               "bias_correction": bias_correction, "trust": norm_bias_trust or p.ndim > 1} for p in start]
    want = reference_pmdlamb(start, grad_steps, groups)
    for name, got, w in zip(names, model.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach().double(), w, rtol=1e-5, atol=1e-7, msg=name)
    bn = model.backbone.body[1]
    assert {g["trust"] for g in opt.param_groups if any(p is bn.weight for p in g["params"])} == {norm_bias_trust}


def test_bias_correction_bounds_the_first_steps():
    """Without bias correction, Algorithm 1's first step is m/sqrt(v) = (1 - b1)/sqrt(1 - b2) = 3.16 per element
    (an excluded tensor moves lr x alpha x 3.16); with it, 1. Under the trust ratio the move is lr x alpha x ||x||
    either way."""
    for bc, per_element in ((False, 0.1 / math.sqrt(0.001)), (True, 1.0)):
        p = torch.nn.Parameter(torch.ones(16))
        opt = PMDLAMB([{"params": [p], "trust": False, "weight_decay": 0.0}], lr=2.0, alpha=0.05, eps=0.0,
                      bias_correction=bc)
        p.grad = torch.full((16,), 0.3)
        opt.step()
        torch.testing.assert_close(1.0 - p.detach(), torch.full((16,), 2.0 * 0.05 * per_element))
        q = torch.nn.Parameter(torch.ones(16))
        trusted = PMDLAMB([q], lr=2.0, alpha=0.05, eps=0.0, weight_decay=0.0, bias_correction=bc)
        q.grad = torch.full((16,), 0.3)
        trusted.step()
        assert float((1.0 - q.detach()).norm()) == pytest.approx(2.0 * 0.05 * 4.0)  # lr x alpha x ||x|| = 0.1 x 4


def test_build_optimizer_passes_the_mechanisms_to_the_groups():
    opt = build_optimizer(ConvBN(), "lamb", lr=0.1, weight_decay=5e-4)  # the defaults: Apex's exclusion, corrected
    assert [g["trust"] for g in opt.param_groups] == [True, False]
    assert all(g["bias_correction"] for g in opt.param_groups)
    paper = build_optimizer(ConvBN(), "pmdlamb", lr=0.1, weight_decay=5e-4, norm_bias_trust=True,
                            bias_correction=False)  # Algorithm 1 as written
    assert all(g["trust"] for g in paper.param_groups)
    assert not any(g["bias_correction"] for g in paper.param_groups)
    sgd = build_optimizer(ConvBN(), "sgd", lr=0.1, weight_decay=5e-4, bias_correction=False)  # not SGD's: ignored
    assert isinstance(sgd, torch.optim.SGD)


def test_toy_collapse_reproduced_and_gone_under_the_default():
    """Issue 20's toy collapse (benchmarks/toy_collapse.py): a conv+BN net under PMD-LAMB at batch 64's linear-rule
    lr (1.6, 2-iteration warmup): the old handling (norm/bias excluded from the trust ratio, no bias correction)
    drives a fifth or more of the BN scales to <= 0; the recipe defaults (hvdet.config.SolverConfig) none."""
    import sys

    from hvdet.config import SolverConfig
    from tests.harness import ROOT

    sys.path.insert(0, str(ROOT))
    from benchmarks.toy_collapse import toy_collapse

    old = toy_collapse(64, norm_bias_trust=False, bias_correction=False)
    assert old["gamma_nonpositive"] >= 0.15, old
    s = SolverConfig()
    fixed = toy_collapse(64, norm_bias_trust=s.norm_bias_trust, bias_correction=s.bias_correction)
    assert fixed["gamma_nonpositive"] == 0.0 and fixed["gamma_min"] > 0.25, fixed

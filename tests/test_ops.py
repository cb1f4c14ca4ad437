"""The kernel layer (hvdet.ops) against its oracles, on CPU: the Triton kernels run under Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before hvdet is imported), the C++ LAMB
kernel natively, each compared with the torch reference and with float64 maths written here.
The same kernels compiled for a GPU are checked by tests/test_gpu.py (``pytest -m gpu``).
"""
import inspect
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hvdet.ops import bn as ops_bn
from hvdet.ops import lamb as ops_lamb
from hvdet.ops.triton_support import interpreting, triton_available
from tests.launches import hook_launches, kernel_launches

pytestmark = pytest.mark.skipif(not (triton_available() and interpreting()),
                                reason="Triton is not installed, or CUDA is present (tests/test_gpu.py covers it)")

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# (PMD-)LAMB
# ---------------------------------------------------------------------------------------------

def lamb_problem(grad_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(70, 130), (4096,), (4097,), (3, 7), (1,), (2, 4096)]  # full blocks, tails, a 1-element tensor
    xs = [torch.randn(s, generator=gen) for s in shapes]
    xs[4].zero_()  # ||x|| = 0: phi = 1
    gs = [torch.randn(s, generator=gen).to(grad_dtype) for s in shapes]
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=gen) * 0.01 for s in shapes]
    rows = torch.tensor([[0.9 * 0.8, 0.1, 0.999 * 0.8, 0.001, 1.1, 1.3, 1e-6, 5e-4, 0.01, float(i % 2 == 0)]
                         for i in range(len(shapes))], dtype=torch.float64)
    return [xs, gs, ms, vs], rows


def reference_update(tensors, rows, scale):
    """The update of hvdet.ops.lamb's docstring, in float64, one tensor at a time."""
    out = []
    for x, g, m, v, c in zip(*tensors, rows.tolist(), strict=True):
        b1, omb1, b2, omb2, bc1, bc2, eps, wd, step, trust = c
        x, g, m, v = (t.double() for t in (x, g, m, v))
        g = g * scale
        m = b1 * m + omb1 * g
        v = b2 * v + omb2 * g * g
        u = m * bc1 / ((v * bc2).sqrt() + eps) + wd * x
        xn, un = x.norm(), u.norm()
        phi = xn / un if trust and xn > 0 and un > 0 else 1.0
        out.append((x - step * phi * u, m, v, float(xn), float(un)))
    return out


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_elems", [None, 5000])
def test_triton_lamb_matches_reference_and_float64_oracle(grad_dtype, group_elems, monkeypatch):
    monkeypatch.setattr(ops_lamb, "TRITON_GROUP_ELEMS", group_elems)
    ref, rows = lamb_problem(grad_dtype)
    got = [[t.clone() for t in ts] for ts in ref]
    oracle = reference_update(ref, rows, 0.5)
    n_ref = ops_lamb.lamb_step(*ref, rows, 0.5, impl="reference")
    n_got = ops_lamb.lamb_step(*got, rows, torch.tensor([0.5]), impl="triton")
    for i, (x, _m, _v, xn, un) in enumerate(oracle):
        # m is the same fp32 arithmetic in the same order: bit-exact; v and x round within an ulp or
        # two (addcmul, and per-block partial norms summed in another order).
        assert torch.equal(got[2][i], ref[2][i]), f"m[{i}]"
        torch.testing.assert_close(got[3][i], ref[3][i], rtol=2e-7, atol=1e-12, msg=f"v[{i}]")
        torch.testing.assert_close(got[0][i], ref[0][i], rtol=1e-6, atol=1e-7, msg=f"x[{i}]")
        torch.testing.assert_close(got[0][i].double(), x, rtol=1e-5, atol=1e-6, msg=f"x[{i}] vs float64")
        torch.testing.assert_close(n_got[i], torch.tensor([xn, un], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n_got, n_ref, rtol=1e-5, atol=1e-6)


def test_triton_lamb_skips_the_step_on_a_nan_clip_factor():
    tensors, rows = lamb_problem()
    before = [[t.clone() for t in ts] for ts in tensors]
    ops_lamb.lamb_step(*tensors, rows, torch.tensor([math.nan]), impl="triton")
    for ts, bs in zip(tensors, before, strict=True):
        assert all(torch.equal(t, b) for t, b in zip(ts, bs, strict=True))
    with pytest.raises(FloatingPointError, match="clipping factor is nan"):
        ops_lamb.lamb_step(*tensors, rows, torch.tensor([math.nan]), impl="reference")


def test_lamb_plans_follow_the_tensors_addresses():
    """A cached plan is reused only while every address is the same: new gradients, new plan."""
    tensors, rows = lamb_problem()
    ops_lamb.lamb_step(*tensors, rows, 1.0, impl="triton")
    cached = len(ops_lamb._PLANS)
    ops_lamb.lamb_step(*tensors, rows, 1.0, impl="triton")
    assert len(ops_lamb._PLANS) == cached
    fresh = [[t.clone() for t in ts] for ts in tensors]
    expect = [[t.clone() for t in ts] for ts in tensors]
    fresh[1] = [g * 2 for g in fresh[1]]
    expect[1] = [g * 2 for g in expect[1]]
    ops_lamb.lamb_step(*fresh, rows, 1.0, impl="triton")
    ops_lamb.lamb_step(*expect, rows, 1.0, impl="reference")
    for a, b in zip(fresh[0], expect[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_auto_never_takes_the_interpreter_for_cpu_tensors():
    (xs, gs, ms, vs), _ = lamb_problem()
    assert ops_lamb.choose((xs[0], gs[0], ms[0], vs[0])) == "cpp"
    assert ops_lamb.choose((xs[0], gs[0].bfloat16(), ms[0], vs[0])) == "reference"
    assert ops_lamb.choose((xs[0], gs[0], ms[0], vs[0]), "triton") == "triton"
    unaligned = torch.zeros(4097)[1:]
    with pytest.raises(ValueError, match="impl='triton' does not take"):
        ops_lamb.choose((unaligned, gs[2][1:], ms[2][1:], vs[2][1:]), "triton")


# ---------------------------------------------------------------------------------------------
# Cross-GPU BN's local arithmetic
# ---------------------------------------------------------------------------------------------

SHAPES = [((2, 5, 7, 9), "nchw"), ((3, 40, 5, 6), "nhwc"), ((2, 3, 1, 1), "nchw"), ((1, 70, 17, 3), "nchw"),
          ((2, 9, 1, 300), "nhwc")]


def bn_input(shape, layout, dtype, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5 + offset).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "nhwc":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy


@pytest.mark.parametrize(("shape", "layout"), SHAPES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bn_moments_are_exact_in_float64_at_large_mean(shape, layout, impl):
    x, _ = bn_input(shape, layout, torch.float64, offset=1e4)  # |mean| / std = 2e4
    n, mean, m2 = ops_bn.moments(x, impl)
    flat = x.transpose(0, 1).reshape(shape[1], -1)
    assert n == flat.shape[1]
    torch.testing.assert_close(mean, flat.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m2 / n, flat.var(1, unbiased=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("shape", "layout"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_bn_triton_backward_matches_reference(shape, layout, dtype):
    x, dy = bn_input(shape, layout, dtype, offset=3.0)
    _, mean, m2 = ops_bn.moments(x, "reference")
    var = (m2 / (x.numel() // shape[1])).to(mean.dtype)
    acc = ops_bn.acc_dtype(x)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    ref = ops_bn.grad_sums(dy, x, mean, var, 1e-5, acc, "reference")
    got = ops_bn.grad_sums(dy, x, mean, var, 1e-5, acc, "triton")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    total, n = ref[0] * 2, torch.tensor([2.0 * (x.numel() // shape[1])], dtype=torch.float64)  # a "group" of two
    weight = torch.rand(shape[1], dtype=acc) + 0.5
    dx_ref = ops_bn.input_grad_from_sums(dy, x, total, n, weight, mean, var, 1e-5, "reference")
    dx_got = ops_bn.input_grad_from_sums(dy, x, total, n, weight, mean, var, 1e-5, "triton")
    assert dx_got.dtype == dtype and dx_got.stride() == x.stride()
    out_tol = tol if dtype in (torch.float64, torch.float32) else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(dx_got.double(), dx_ref.double(), **out_tol)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bn_group_stats_merge_parts_exactly_and_update_running_stats(impl):
    """Three ranks' packed moments (one empty) merged == moments of the concatenation, float64."""
    xs = [bn_input((2, 4, 3, 5), "nchw", torch.float64, offset=1e4, seed=s)[0] for s in range(2)]
    xs.insert(1, torch.zeros(0, 4, 3, 5, dtype=torch.float64))
    parts = torch.stack([ops_bn.moments_packed(x, impl) for x in xs])
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    mean, var, n = ops_bn.group_stats(parts, torch.float64, rm, rv, 0.1, impl)
    flat = torch.cat([x.transpose(0, 1).reshape(4, -1) for x in xs], 1)
    assert float(n) == flat.shape[1] == 60
    torch.testing.assert_close(mean, flat.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(var, flat.var(1, unbiased=False), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rm, 0.1 * flat.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(rv, 0.9 + 0.1 * flat.var(1, unbiased=True), rtol=1e-12, atol=1e-9)


def test_merge_moments_is_chans_formula():
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(k, 2, generator=gen, dtype=torch.float64) + 5 for k in (3, 1, 6)]
    counts = torch.tensor([[float(len(p))] for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    n, mean, m2 = ops_bn.merge_moments(counts, means, m2s)
    every = torch.cat(parts)
    torch.testing.assert_close(mean, every.mean(0))
    torch.testing.assert_close(m2, ((every - every.mean(0)) ** 2).sum(0))
    assert float(n) == 10


def test_choose_names_what_an_impl_cannot_take():
    x = torch.randn(2, 3, 4, 4)
    assert ops_bn.choose(x, "auto", "backward_reduce") == "aten"
    assert ops_bn.choose(x, "auto", "moments") == "reference"
    with pytest.raises(ValueError, match="CPU backward reduction only"):
        ops_bn.choose(x, "aten", "moments")
    with pytest.raises(ValueError, match="impl='triton' cannot take"):
        ops_bn.choose(torch.randn(2, 3, 4), "triton", "moments")


# ---------------------------------------------------------------------------------------------
# What the interpreter does not check
# ---------------------------------------------------------------------------------------------

def test_every_kernel_launch_names_only_its_own_parameters():
    """Triton's interpreter ignores an unknown keyword at a launch; the compiler raises KeyError on
    the GPU. So every ``kernel[grid](..., NAME=...)`` in hvdet/ops must name a parameter of that kernel."""
    for path in sorted((ROOT / "hvdet" / "ops").glob("*_triton.py")):
        kernels, calls = kernel_launches(path)
        for node in calls:
            names = {k.arg for k in node.keywords} - {"num_warps", "num_stages"}
            assert names <= kernels[node.func.value.id], (path.name, node.func.value.id, names)
        assert len(calls) >= 3, path.name


def test_bn_counters_are_one_buffer_per_stream_and_never_freed(monkeypatch):
    """hvdet.ops.bn_plan.counters: every layer on one stream (here: thread) shares one zeroed buffer of
    MIN_COUNTERS blocks; a wider layer gets a new one and the old is kept, since a captured CUDA graph
    may still write to its address (tests/test_gpu.py replays such a graph on a GPU)."""
    from hvdet.ops import bn_plan

    monkeypatch.setattr(bn_plan, "_COUNTERS", {})
    monkeypatch.setattr(bn_plan, "_RETIRED", [])
    cpu = torch.device("cpu")
    first = bn_plan.counters(cpu, 2)
    assert first.numel() == bn_plan.MIN_COUNTERS and first.dtype == torch.int32 and not first.any()
    assert bn_plan.counters(cpu, bn_plan.MIN_COUNTERS) is first
    wider = bn_plan.counters(cpu, bn_plan.MIN_COUNTERS + 1)
    assert wider is not first and len(bn_plan._RETIRED) == 1 and bn_plan._RETIRED[0] is first
    assert bn_plan.counters(cpu, 2) is wider
    other = []
    thread = threading.Thread(target=lambda: other.append(bn_plan.counters(cpu, 2)))
    thread.start()
    thread.join()
    assert other[0] is not wider  # another simulated rank's launches may run at the same time


@pytest.mark.parametrize(("shape", "programs"), [((70, 3, 2, 2), None), ((5, 11, 20, 30), 8)])
def test_bn_triton_merges_any_number_of_programs_and_leaves_its_counters_zero(shape, programs, monkeypatch):
    """The last program of a channel block to finish merges every program's partials: more programs than
    one merge step takes (70 > MERGE_ROWS), and programs of several units each (PROGRAMS patched to 8:
    4 programs of 4, 4, 4, 3 units). The result equals the reference and is the same bits again (the merge
    order is fixed), and every arrival counter is zero after each launch, so the next launch, the next
    layer's, starts from zero."""
    from hvdet.ops import bn_plan, bn_triton

    if programs:
        monkeypatch.setattr(bn_plan, "PROGRAMS", programs)
    bn_plan._plan_of.cache_clear()  # the plans depend on PROGRAMS
    try:
        x, dy = bn_input(shape, "nchw", torch.float64, offset=1e4)
        work = (bn_plan.plan(x).grid[0], bn_plan.plan(x).units_per_prog)
        assert work[0] > bn_triton.MERGE_ROWS if programs is None else work == (4, 4)
        got = ops_bn.moments_packed(x, "triton")
        assert not any(buf.any() for buf in bn_plan._COUNTERS.values())
        torch.testing.assert_close(got, ops_bn.moments_packed(x, "reference"), rtol=1e-12, atol=1e-9)
        assert torch.equal(ops_bn.moments_packed(x, "triton"), got)
        c = shape[1]
        mean, var = got[1:c + 1], got[c + 1:] / got[0]
        sums = ops_bn.grad_sums(dy, x, mean, var, 1e-5, torch.float64, "triton")
        assert not any(buf.any() for buf in bn_plan._COUNTERS.values())
        for a, b in zip(sums, ops_bn.grad_sums(dy, x, mean, var, 1e-5, torch.float64, "reference"), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    finally:
        bn_plan._plan_of.cache_clear()


TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def launch_record(module: str, name: str, kernel, args: tuple, kwargs: dict) -> dict:
    """A launch in Triton's terms: the signature ("*fp32", "i32", ... or "constexpr") and the constexpr
    values, as tests/_compile_kernels.py compiles it (two launches with one record compile the same)."""
    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters
    bound = {**dict(zip(kernel.arg_names, args, strict=False)),
             **{k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}}
    sig, consts = {}, {}
    for pname, value in bound.items():
        if params[pname].annotation in (tl.constexpr, "tl.constexpr"):
            sig[pname] = "constexpr"
            consts[pname] = ["dtype", str(value)] if isinstance(value, tl.dtype) else ["value", value]
        elif isinstance(value, torch.Tensor):
            sig[pname] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[pname] = "i1"
        elif isinstance(value, int):
            sig[pname] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            sig[pname] = "fp32"  # a Python float: Triton passes it as fp32
    return {"module": module, "kernel": name, "signature": sig, "constexprs": consts}


def record_launches(monkeypatch, module) -> list:
    """Every launch of ``module`` (a hvdet.ops.*_triton module) is recorded (:func:`launch_record`) into the
    list returned; the launches still run."""
    log: list = []

    def record(name, kernel, grid, args, kwargs):
        log.append(launch_record(module.__name__, name, kernel, args, kwargs))
        return kernel[grid](*args, **kwargs)
    hook_launches(monkeypatch, module, record)
    return log


def test_a_cgbn_layer_step_is_four_triton_launches(monkeypatch):
    """Issue 22's launch budget: forward = the moments (with this rank's pack) and the group merge,
    backward = the reductions (with their pack) and dx; counted at every launch site of bn_triton.py.
    The layer (a group of one running CGBN's own arithmetic) still equals BatchNorm2d."""
    from hvdet.nn.cross_gpu_bn import CrossGPUBatchNorm2d
    from hvdet.ops import bn_triton
    from tests.simulated import run_in_threads

    log = record_launches(monkeypatch, bn_triton)

    def step(_world):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(3, 6, 5, 4, generator=gen, dtype=torch.float64) + 2).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        bn = CrossGPUBatchNorm2d(6, stats="chan", impl="triton").double()
        bn.force_group_path = True
        ref = torch.nn.BatchNorm2d(6).double()
        for layer, inp in ((bn, x), (ref, x_ref)):
            layer(inp).mul(torch.arange(6, dtype=torch.float64).view(1, -1, 1, 1)).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(bn.running_var, ref.running_var)

    run_in_threads(step, 1)
    assert [launch["kernel"] for launch in log] == ["_moments", "_group_stats", "_backward_reduce", "_input_grad"]


def every_triton_launch(monkeypatch) -> list:
    """The distinct launches (:func:`launch_record`) of hvdet's Triton kernels over the dtypes, layouts and
    options the CPU tests take: CGBN's four in fp64/fp32/bf16/fp16, NCHW and NHWC, with and without
    weight and running statistics; the LAMB kernels with fp32/bf16/fp16 gradients."""
    from hvdet.ops import bn_triton, lamb_triton

    bn_log, lamb_log = record_launches(monkeypatch, bn_triton), record_launches(monkeypatch, lamb_triton)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for layout in ("nchw", "nhwc"):
            x, dy = bn_input((2, 5, 7, 9), layout, dtype, offset=1.0)
            acc = ops_bn.acc_dtype(x)
            parts = torch.stack([ops_bn.moments_packed(x, "triton")] * 2)
            rm, rv = torch.zeros(5, dtype=acc), torch.ones(5, dtype=acc)
            mean, var, n = ops_bn.group_stats(parts, acc, rm, rv, 0.1, "triton")
            ops_bn.group_stats(parts, acc, impl="triton")
            total, _, _ = ops_bn.grad_sums(dy, x, mean, var, 1e-5, acc, "triton")
            for weight in (torch.ones(5, dtype=acc), None):
                ops_bn.input_grad_from_sums(dy, x, total, n, weight, mean, var, 1e-5, "triton")
    for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensors, rows = lamb_problem(grad_dtype)
        ops_lamb.lamb_step(*tensors, rows, torch.tensor([0.5]), impl="triton")
    distinct = {json.dumps(launch, sort_keys=True): launch for launch in bn_log + lamb_log}
    return list(distinct.values())


@pytest.mark.slow
def test_every_triton_launch_compiles_for_a100_and_h100_without_a_gpu(monkeypatch):
    """The interpreter runs code that Triton's compiler rejects (it caught a branch that redefined a
    variable with another dtype, which the interpreter ran and the GPU would have refused at the first
    launch). So every distinct launch the CPU tests make is compiled by Triton's own compiler for sm_80
    and sm_90, down to a cubin with the wheel's ptxas, in a process without TRITON_INTERPRET; and the
    kernels that merge in their last program carry what that needs in their PTX: a CTA barrier, an
    acquire-release atomic at GPU scope, the counter's reset, loads from L2."""
    launches = every_triton_launch(monkeypatch)
    assert {launch["kernel"] for launch in launches} >= {"_moments", "_group_stats", "_backward_reduce",
                                                          "_input_grad", "_stage1", "_norms", "_stage2"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_compile_kernels.py"), "80", "90"],
                          input=json.dumps(launches), capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 * len(launches)
    failed = [f"{r['kernel']} sm_{r['cc']} {r['signature']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    for r in rows:
        assert r["cubin_bytes"] > 0
        if r["kernel"] in ("_moments", "_backward_reduce"):
            ptx = set(r["ptx"])
            assert {"bar.sync", "atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.acq_rel.exch.b32"} <= ptx, r
            assert any(p.startswith("ld.global.cg") for p in ptx), r

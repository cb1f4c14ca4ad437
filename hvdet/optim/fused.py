"""The fused multi-tensor (PMD-)LAMB update, and how it is built.

One call updates every parameter tensor of an optimizer. Per tensor it takes a row of
coefficients (see :data:`COEFS`), so param groups with different lr, weight decay, betas or trust
flags, and tensors at different steps of the PMD cycle, all go through the same call.

Backends:

* ``"kernel"``: ``csrc/lamb_cpu.cpp``, compiled once with ``torch.utils.cpp_extension`` (ninja) and
  cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). It takes contiguous
  fp32 CPU tensors and makes two passes over memory (40 bytes per parameter), which is what a
  memory-bound step allows. ``python -m hvdet.optim.fused --build`` builds it ahead of time.
* ``"foreach"``: ``torch._foreach_*`` ops; any device and dtype (the CUDA path, fp16/bf16 grads,
  and the fallback when no C++ compiler is at hand). On CPU each foreach op is another pass over
  memory, so it is several times slower than the kernel there.
* ``"auto"``: the kernel for the tensors it takes, foreach for the rest.

Set ``HVDET_LAMB_BACKEND=foreach`` to never build or load the kernel.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "lamb_cpu.cpp"
# Per-tensor coefficient columns, in the order of the enum in csrc/lamb_cpu.cpp.
COEFS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_corr1", "bias_corr2", "eps",
         "weight_decay", "step_size", "trust")
BACKENDS = ("auto", "kernel", "foreach")
# Tensors are updated in blocks of about this many elements (pass 1 then pass 2 per block), so pass 2
# finds the block's moments and weights still in cache: 1M fp32 elements x (x, g, m, v) = 16 MB,
# half the 32 MB L3 this was tuned on (benchmarks/optimizer_step.py --block-sweep).
BLOCK_ELEMS = 1 << 20
# -fopenmp: at::parallel_for is header-only OpenMP (ATen/ParallelOpenMP.h), serial without it. The
# OpenMP runtime is then libgomp.so.1, the very one torch has already loaded (same soname).
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_kernel = None
_kernel_error: str | None = None


def _cpu_tag() -> str:
    """The CPU model and flags: -march=native code must not be loaded on another kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform
        return platform.processor() or platform.machine()


def extension_name() -> str:
    """Build name: changes with the source, the flags, the torch version and the CPU."""
    digest = hashlib.sha1()
    for part in (SOURCE.read_bytes(), " ".join(_CFLAGS + _LDFLAGS).encode(), torch.__version__.encode(), _cpu_tag().encode()):
        digest.update(part)
    return f"hvdet_lamb_cpu_{digest.hexdigest()[:12]}"


def load_kernel(verbose: bool = False):
    """The compiled kernel module, building it on first use (cached on disk); raises on failure."""
    global _kernel
    if _kernel is None:
        # A CUDA build of torch on a machine without CUDA warns about CUDA_HOME; this source is C++ only.
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension

            _kernel = cpp_extension.load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=_CFLAGS,
                                         extra_ldflags=_LDFLAGS, with_cuda=False, verbose=verbose)
        finally:
            logger.setLevel(level)
    return _kernel


def kernel_available() -> bool:
    """True if the kernel loads (building it if needed); the first failure is remembered and warned."""
    global _kernel_error
    if os.environ.get("HVDET_LAMB_BACKEND") == "foreach":
        return False
    if _kernel is not None:
        return True
    if _kernel_error is None:
        try:
            load_kernel()
            return True
        # No compiler, no ninja, a read-only cache: fall back to foreach, and say so once.
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
            _kernel_error = f"{type(err).__name__}: {err}"
            warnings.warn(f"hvdet: the fused LAMB kernel could not be built ({_kernel_error.splitlines()[0]}); "
                          "using the slower torch._foreach path. Run `python -m hvdet.optim.fused --build` to see why.",
                          RuntimeWarning, stacklevel=3)
    return False


def _kernel_ok(tensors: tuple, f32=torch.float32) -> bool:
    # is_cpu and `is` instead of device.type and ==: this runs for every tensor at every step.
    return all(t.is_cpu and t.dtype is f32 and t.is_contiguous() for t in tensors)


def lamb_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, coefs: torch.Tensor,
              grad_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Update every tensor in place; returns float64 [n, 2]: ||x|| (before) and ||u|| per tensor.

    ``coefs`` is a float64 CPU tensor [n, len(COEFS)]; gradients are multiplied by ``grad_scale``
    (global-norm clipping) as they are read.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n) or tuple(coefs.shape) != (n, len(COEFS)):
        raise ValueError(f"lamb_step: {n} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
                         f"{len(exp_avg_sqs)} exp_avg_sqs and coefs of shape {tuple(coefs.shape)} do not match")
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    quads = list(zip(params, grads, exp_avgs, exp_avg_sqs))
    to_kernel = [i for i, q in enumerate(quads) if _kernel_ok(q)] if backend != "foreach" else []
    if backend == "kernel" and len(to_kernel) < n:
        raise ValueError("backend='kernel' takes contiguous float32 CPU tensors only; use 'auto'")
    if to_kernel and not kernel_available():
        if backend == "kernel":
            raise RuntimeError(f"the fused LAMB kernel is unavailable: "
                               f"{_kernel_error or 'disabled by HVDET_LAMB_BACKEND=foreach'}")
        to_kernel = []
    parts = [(to_kernel, "kernel")] if to_kernel else []
    kernel_set = set(to_kernel)
    by_kind: dict[tuple, list[int]] = {}
    for i in range(n):  # foreach ops need one device and dtype per call
        if i not in kernel_set:
            by_kind.setdefault((params[i].device, params[i].dtype), []).append(i)
    parts += [(ids, "foreach") for ids in by_kind.values()]
    results = []
    for ids, how in parts:
        sub = [[t[i] for i in ids] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        rows = coefs if len(ids) == n else coefs[torch.tensor(ids)].contiguous()
        if how == "kernel":
            results.append(_kernel.lamb_step(*sub, rows, float(grad_scale), BLOCK_ELEMS))
        else:
            results.append(_lamb_foreach(*sub, rows, grad_scale))
    if len(parts) == 1:
        return results[0]  # stays on its device: no host sync on CUDA
    norms = torch.zeros(n, 2, dtype=torch.float64)
    for (ids, _), result in zip(parts, results):
        norms[torch.tensor(ids)] = result.cpu()
    return norms


def _lamb_foreach(params, grads, exp_avgs, exp_avg_sqs, coefs, grad_scale) -> torch.Tensor:
    """The same update with torch._foreach ops (one device and dtype); the math is the kernel's."""
    device = params[0].device
    b1, omb1, b2, omb2, bc1, bc2, eps, wd, _, _ = coefs.t().tolist()  # host floats: no device traffic
    on_device = coefs.to(device, non_blocking=True)
    step_size, use_trust = on_device[:, COEFS.index("step_size")], on_device[:, COEFS.index("trust")] != 0
    g = [gr.to(p.dtype) for gr, p in zip(grads, params)] if grads[0].dtype != params[0].dtype else list(grads)
    if grad_scale != 1.0:
        g = torch._foreach_mul(g, grad_scale)
    torch._foreach_mul_(exp_avgs, b1)                              # xi beta1 m_{t-1}
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g, omb1))     # m_t
    torch._foreach_mul_(exp_avg_sqs, b2)                           # xi beta2 v_{t-1}
    torch._foreach_addcmul_(exp_avg_sqs, g, g, omb2)               # v_t
    denom = torch._foreach_sqrt(torch._foreach_mul(exp_avg_sqs, bc2))
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(exp_avgs, bc1)
    torch._foreach_div_(update, denom)                             # r_t
    torch._foreach_add_(update, torch._foreach_mul(params, wd))    # u_t = r_t + lambda x_t
    x_norm = torch.stack(torch._foreach_norm(params)).double()
    u_norm = torch.stack(torch._foreach_norm(update)).double()
    phi = torch.where(use_trust & (x_norm > 0) & (u_norm > 0), x_norm / u_norm, torch.ones_like(x_norm))
    # Per-tensor step sizes stay on the device (0-d tensors): no host sync on CUDA.
    steps = (-step_size * phi).to(params[0].dtype)
    torch._foreach_mul_(update, list(steps.unbind()))
    torch._foreach_add_(params, update)                            # x_{t+1} = x_t - lr alpha phi u_t
    return torch.stack([x_norm, u_norm], dim=1)


def global_grad_norm(grads: list) -> float:
    """||g|| over all tensors (Apex FusedLAMB's max_grad_norm clips by this)."""
    if not grads:
        return 0.0
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    sq = sum(float(torch.stack(torch._foreach_norm(gs)).double().square().sum()) for gs in by_device.values())
    return sq ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdet.optim.fused", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or find) the compiled kernel and say where")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    start_s = time.perf_counter()
    try:
        module = load_kernel(verbose=args.verbose)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        print(f"hvdet: building the fused LAMB kernel failed ({type(err).__name__}: {err}); "
              "hvdet falls back to the torch._foreach path, which is correct but slower on CPU. "
              "It needs a C++ compiler (g++) and ninja.", file=sys.stderr)
        return 1
    print(f"fused LAMB kernel ready: {module.__file__} ({time.perf_counter() - start_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

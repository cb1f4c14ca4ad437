"""The PMD-LAMB/LAMB update as a C++ CPU kernel (``csrc/lamb_cpu.cpp``), and how it is built.

Compiled once with ``torch.utils.cpp_extension`` (ninja) and cached under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``). It takes contiguous fp32 CPU tensors and makes two passes
over memory (40 bytes per parameter), block by block so that the second pass finds the first's data
in cache: what a memory-bound step allows. ``python -m hvdet.ops.lamb_cpp --build`` builds it ahead
of time; ``HVDET_LAMB_IMPL=reference`` never builds or loads it. Dispatch: :mod:`hvdet.ops.lamb`.
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
    """Build name: changes with the source, the flags, the torch version, the CPU and the source's path
    (torch's build file records the path: two checkouts sharing ~/.cache/torch_extensions under one
    name would rebuild over each other at every switch)."""
    digest = hashlib.sha1()
    for part in (SOURCE.read_bytes(), " ".join(_CFLAGS + _LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_tag().encode(), str(SOURCE).encode()):
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
    if os.environ.get("HVDET_LAMB_IMPL") == "reference":
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
                          "using the slower torch reference (foreach) path. "
                          "Run `python -m hvdet.ops.lamb_cpp --build` to see why.",
                          RuntimeWarning, stacklevel=3)
    return False


def accepts(tensors: tuple, f32=torch.float32) -> bool:
    """True if the kernel takes these (param, grad, m, v) tensors: contiguous fp32 on the CPU."""
    # is_cpu and `is` instead of device.type and ==: this runs for every tensor at every step.
    return all(t.is_cpu and t.dtype is f32 and t.is_contiguous() for t in tensors)


def step(params, grads, exp_avgs, exp_avg_sqs, coefs: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """One fused call over every tensor; returns float64 [n, 2]: ||x|| (before) and ||u||."""
    return _kernel.lamb_step(params, grads, exp_avgs, exp_avg_sqs, coefs, float(grad_scale), BLOCK_ELEMS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdet.ops.lamb_cpp", description=__doc__.split("\n")[0])
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
              "hvdet falls back to the torch reference (foreach) path, which is correct but slower on CPU. "
              "It needs a C++ compiler (g++) and ninja.", file=sys.stderr)
        return 1
    print(f"fused LAMB kernel ready: {module.__file__} ({time.perf_counter() - start_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

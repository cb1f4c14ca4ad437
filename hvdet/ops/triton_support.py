"""Whether Triton kernels can run here, on which tensors, and the precision kernels and references
accumulate in.

Triton ships with torch's CUDA wheels (not with the CPU or aarch64 ones). Compiled kernels need a
CUDA device; ``TRITON_INTERPRET=1`` (read when the kernels are defined, so set it before importing
hvdet) runs the same kernels on CPU tensors with numpy, slowly: that is how CI checks them.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(t: torch.Tensor) -> bool:
    """True if a Triton kernel can take tensor ``t`` (CUDA, or any CPU tensor under the interpreter)."""
    if not triton_available():
        return False
    if interpreting():
        return t.device.type == "cpu"
    return t.is_cuda and _supported_gpu(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _supported_gpu(index: int) -> bool:
    # Triton's supported NVIDIA GPUs start at compute capability 8.0 (A100); a DGX-2's V100 (7.0)
    # takes the torch reference implementations instead.
    return torch.version.hip is not None or torch.cuda.get_device_capability(index) >= (8, 0)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of statistics over ``x``: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32

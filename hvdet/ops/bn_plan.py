"""How Cross-GPU BN's Triton kernels split a tensor over programs, and what their launches share.

Host-side only (no Triton import): the layouts the kernels take (:func:`accepts`), each shape's
launch plan (grid, tile, work split; cached, as a training step meets the same few shapes every
step), the arrival counters of the kernels that merge in their last program, and a float64 scalar
split into two fp32 kernel arguments. The kernels are :mod:`hvdet.ops.bn_triton`.
"""
from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import numpy as np
import torch

TILES = {True: (256, 8), False: (32, 64)}   # (BLOCK_HW, BLOCK_C) for NCHW (hw contiguous) / NHWC
PROGRAMS = 2048                             # programs per pass over x (all channel blocks): fills a GPU


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_hw) when H and W flatten into one pixel stride (NCHW or NHWC), else None."""
    _, _, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if h == 1 or w == 1 or s_h == w * s_w:
        return s_n, s_c, (s_w if w > 1 else s_h)
    return None


def accepts(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) \
        and strides(x) is not None


class Plan(NamedTuple):
    """Grid, tile and work split of a tensor: the same for every call with its shape and strides."""
    grid: tuple[int, int]           # (programs P, channel blocks)
    units: int                      # (image, pixel block) units
    n_hb: int                       # pixel blocks per image
    hw: int
    units_per_prog: int
    block_hw: int
    block_c: int
    strides: tuple[int, int, int]   # (s_n, s_c, s_hw)


@functools.lru_cache(maxsize=1024)
def _plan_of(shape: tuple[int, ...], s: tuple[int, int, int]) -> Plan:
    n, c, h, w = shape
    hw = h * w
    block_hw, block_c = TILES[s[2] == 1 and hw > 1]
    n_hb = max(1, _cdiv(hw, block_hw))
    units = n * n_hb
    c_blocks = _cdiv(c, block_c)
    units_per_prog = max(1, _cdiv(units, max(1, PROGRAMS // c_blocks)))
    progs = max(1, _cdiv(units, units_per_prog))
    return Plan((progs, c_blocks), units, n_hb, hw, units_per_prog, block_hw, block_c, s)


def plan(x: torch.Tensor) -> Plan:
    """x's plan, cached by shape and strides: a training step meets the same few shapes every time."""
    return _plan_of(tuple(x.shape), strides(x))


_COUNTERS: dict = {}  # (device, stream or thread) -> int32 counters
_RETIRED: list = []   # counters outgrown by a wider layer: kept, a captured CUDA graph may still use them
MIN_COUNTERS = 4096   # channel blocks: C = 32768 at NCHW's 8 channels a block, so no real layer outgrows it


def counters(device: torch.device, blocks: int) -> torch.Tensor:
    """int32 arrival counters, all zero, for ``blocks`` channel blocks: one buffer per device and stream,
    reused by every launch (each launch leaves them zero). Launches that may run at the same time must
    not share one: those of two CUDA streams, or of two threads under the interpreter (simulated ranks).

    A buffer is never freed. A CUDA graph keeps the address its capture saw, and the capture stream is a
    pooled stream that eager launches (make_graphed_callables' warm-up) can draw too: had a wider layer
    replaced the buffer, the graph's next replay would write into memory freed and perhaps returned to the
    driver. So a buffer starts at 4096 blocks (16 KiB, one growth at most for any real layer) and an
    outgrown one is kept. One born inside a capture is zeroed by that graph's memset, at its first replay,
    which hvdet.models.cuda_graphs runs right after the capture."""
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else threading.get_ident())
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < blocks:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(blocks, MIN_COUNTERS), device=device, dtype=torch.int32)
    return buf


@functools.lru_cache(maxsize=256)
def split(value: float) -> tuple[float, float]:
    """value = hi + lo with hi and lo exact fp32 numbers: a float64 scalar through fp32 kernel arguments.
    Cached: the momentum is the same every step (1/t with momentum=None: one entry per step, bounded)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))

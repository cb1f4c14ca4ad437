"""Cross-GPU BN's per-channel passes as Triton kernels, for NCHW and channels-last (NHWC) tensors.

A [N, C, H, W] tensor is read as a matrix of R = N*H*W rows by C channels, element (r, c) at
``(r // HW) * s_n + c * s_c + (r % HW) * s_hw`` (NCHW: s_hw = 1; NHWC: s_c = 1, which Triton
specializes on, so either layout's contiguous axis is read with wide loads). Each program takes a
[BLOCK_R, BLOCK_C] tile per loop trip over its share of rows:

* ``moments``: per channel (count, mean, M2) of its rows, each tile's own mean and squared
  deviations merged into the running ones with Chan et al.'s formula (exact, no E[x^2] - mu^2),
  one read of x; the programs' partials are merged the same way by the caller (hvdet.ops.bn).
* ``backward_reduce``: per channel sum(dy) and sum(dy * (x - mean)), one read of dy and x.
* ``input_grad``: dx = a dy + b x + c per channel, one read of dy and x and one write of dx.

Statistics accumulate in fp32 (fp64 for fp64 input) whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 64
BLOCK_C = 32
PROGRAMS_PER_CHANNEL_BLOCK = 256   # row shares per channel block: enough programs to fill a GPU


@triton.jit
def _tile(ptr, r0, c_idx, R, C, HW, s_n, s_c, s_hw, BLOCK_R: tl.constexpr):
    rows = r0 + tl.arange(0, BLOCK_R)
    row_off = (rows // HW).to(tl.int64) * s_n + (rows % HW).to(tl.int64) * s_hw
    offs = row_off[:, None] + c_idx.to(tl.int64)[None, :] * s_c
    mask = (rows < R)[:, None] & (c_idx < C)[None, :]
    return offs, mask, rows


@triton.jit
def _moments(x_ptr, cnt_out, mean_out, m2_out, R, C, HW, s_n, s_c, s_hw, rows_per_prog,
             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    start = p * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, R)
    for r0 in range(start, stop, BLOCK_R):
        offs, mask, rows = _tile(x_ptr, r0, c_idx, stop, C, HW, s_n, s_c, s_hw, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_t = tl.sum((rows < stop).to(ACC), axis=0)                       # rows in this tile
        mean_t = tl.sum(x, axis=0) / n_t
        d = tl.where(mask, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        # Chan, Golub, LeVeque: merge (n, mean, M2) with the tile's (n_t, mean_t, m2_t).
        total = n + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / total)
        m2 = m2 + m2_t + delta * delta * (n * n_t / total)
        n = total
    out = p * C + c_idx
    keep = c_idx < C
    tl.store(cnt_out + out, n, mask=keep)
    tl.store(mean_out + out, mean, mask=keep)
    tl.store(m2_out + out, m2, mask=keep)


@triton.jit
def _backward_reduce(dy_ptr, x_ptr, mean_ptr, sum_dy_out, sum_dy_xmu_out, R, C, HW, s_n, s_c, s_hw,
                     g_n, g_c, g_hw, rows_per_prog, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c_idx, mask=c_idx < C, other=0.0).to(ACC)
    acc_dy = tl.zeros([BLOCK_C], dtype=ACC)
    acc_dy_xmu = tl.zeros([BLOCK_C], dtype=ACC)
    start = p * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, R)
    for r0 in range(start, stop, BLOCK_R):
        offs, mask, _rows = _tile(x_ptr, r0, c_idx, stop, C, HW, s_n, s_c, s_hw, BLOCK_R)
        g_offs, _, _ = _tile(dy_ptr, r0, c_idx, stop, C, HW, g_n, g_c, g_hw, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        acc_dy += tl.sum(dy, axis=0)
        acc_dy_xmu += tl.sum(tl.where(mask, dy * (x - mean[None, :]), 0.0), axis=0)
    out = p * C + c_idx
    keep = c_idx < C
    tl.store(sum_dy_out + out, acc_dy, mask=keep)
    tl.store(sum_dy_xmu_out + out, acc_dy_xmu, mask=keep)


@triton.jit
def _input_grad(dy_ptr, x_ptr, dx_ptr, a_ptr, b_ptr, c_ptr, R, C, HW, s_n, s_c, s_hw, g_n, g_c, g_hw,
                rows_per_prog, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c_idx < C
    a = tl.load(a_ptr + c_idx, mask=keep, other=0.0).to(ACC)[None, :]
    b = tl.load(b_ptr + c_idx, mask=keep, other=0.0).to(ACC)[None, :]
    c = tl.load(c_ptr + c_idx, mask=keep, other=0.0).to(ACC)[None, :]
    start = p * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, R)
    for r0 in range(start, stop, BLOCK_R):
        offs, mask, _rows = _tile(x_ptr, r0, c_idx, stop, C, HW, s_n, s_c, s_hw, BLOCK_R)
        g_offs, _, _ = _tile(dy_ptr, r0, c_idx, stop, C, HW, g_n, g_c, g_hw, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        dx = a * dy + b * x + c
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)   # dx has x's strides


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_hw) when H and W flatten into one row stride (NCHW or NHWC), else None."""
    _n, _c, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if h == 1 or s_h == w * s_w:
        return s_n, s_c, s_w if w > 1 or h == 1 else s_h
    return None


def accepts(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) \
        and strides(x) is not None


def _grid(x: torch.Tensor) -> tuple[tuple[int, int], int, int, int]:
    n, c, h, w = x.shape
    rows = n * h * w
    row_blocks = max(1, triton.cdiv(rows, BLOCK_R))
    progs = min(row_blocks, PROGRAMS_PER_CHANNEL_BLOCK)
    rows_per_prog = triton.cdiv(row_blocks, progs) * BLOCK_R
    progs = max(1, triton.cdiv(rows, rows_per_prog))
    return (progs, triton.cdiv(c, BLOCK_C)), rows, h * w, rows_per_prog


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def moments_partials(x: torch.Tensor):
    """Per program and channel (count, mean, M2): three [P, C] tensors in the accumulation dtype."""
    grid, rows, hw, rows_per_prog = _grid(x)
    acc = _acc(x)
    outs = [torch.empty(grid[0], x.shape[1], device=x.device, dtype=acc) for _ in range(3)]
    _moments[grid](x, *outs, rows, x.shape[1], hw, *strides(x), rows_per_prog,
                   ACC=_TL[acc], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return outs


def backward_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
    """Per channel sum(dy) and sum(dy * (x - mean)), in the accumulation dtype."""
    grid, rows, hw, rows_per_prog = _grid(x)
    acc = _acc(x)
    sum_dy, sum_dy_xmu = (torch.empty(grid[0], x.shape[1], device=x.device, dtype=acc) for _ in range(2))
    _backward_reduce[grid](dy, x, mean.contiguous(), sum_dy, sum_dy_xmu, rows, x.shape[1], hw, *strides(x),
                           *strides(dy), rows_per_prog, ACC=_TL[acc], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return sum_dy.sum(0), sum_dy_xmu.sum(0)


def input_grad(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """dx = a dy + b x + c per channel, in x's dtype and memory format."""
    grid, rows, hw, rows_per_prog = _grid(x)
    acc = _acc(x)
    dx = torch.empty_like(x)  # preserve_format: the same strides as x
    coefs = [t.to(acc).contiguous() for t in (a, b, c)]
    _input_grad[grid](dy, x, dx, *coefs, rows, x.shape[1], hw, *strides(x), *strides(dy), rows_per_prog,
                      ACC=_TL[acc], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return dx

"""Cross-GPU BN's per-channel work as Triton kernels: four launches per layer, forward and backward.

A [N, C, H, W] tensor (NCHW or channels-last) is read in tiles of one image: BLOCK_HW pixels x
BLOCK_C channels at ``n * s_n + hw * s_hw + c * s_c``. Whichever of s_hw (NCHW) or s_c (NHWC) is 1,
Triton specializes on it and reads that axis with wide, coalesced loads; the tile shape follows the
layout. Program p of channel block b takes a contiguous share of the (image, pixel block) units.

Forward, two launches and the collective:
  1. ``_moments``: per program and channel (count, mean, M2) of its tiles, each tile's own mean and
     squared deviations merged with Chan et al.'s formula (exact; one read of x); then the last
     program of a channel block to finish merges every program's partials (in program order:
     deterministic) into this rank's packed float64 (n_i, m_i[C], M2_i[C]), the buffer the group
     allgathers;
  2. ``_group_stats``: the group's parts merged likewise into mean and biased variance, and the running
     statistics updated in place (unbiased variance, torch's convention).
Backward, two launches and the collective:
  3. ``_backward_reduce``: per program sum(dy) and sum(dy (x - mean)) (one read of dy and x); the last
     program of a channel block sums the programs' rows into packed float64 (sum dy, sum dy x_hat)
     and the local dgamma, dbeta;
  4. ``_input_grad``: with the group sums: dx = a dy + b x + c, a, b, c computed per channel in the
     kernel from gamma, mean, var, eps and the sums (one read of dy and x, one write of dx).
Statistics accumulate in fp32 (fp64 for fp64 input) and merge in fp64.

"The last program merges" (CUDA's threadFenceReduction sample) folds what were two more launches
(the pack kernels) into the reductions: each program stores its partials, passes a CTA barrier,
and bumps its channel block's arrival counter with an acquire-release atomic; the one that sees
P - 1 arrivals before it reads every partial (L1-bypassing loads) and resets the counter to 0, so
the counters are zero between launches and one buffer per device and stream serves every layer.
On a GPU each launch costs host time (argument packing, the driver call) whatever its size: the
layer is host-bound at detection's shapes, so launches and per-call Python are what to save (the
launch plans and counters: :mod:`hvdet.ops.bn_plan`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hvdet.ops.bn_plan import accepts, counters, plan, split, strides
from hvdet.ops.triton_support import acc_dtype

__all__ = ["accepts", "grad_sums_packed", "group_stats", "input_grad", "local_moments_packed"]

MERGE_BLOCK = 32                            # channels per program of the group merge ...
MERGE_ROWS = 32                             # ... and partial rows per step of every merge


@triton.jit
def _unit_tile(k, n_hb, HW, c_idx, C, s_n, s_c, s_hw, BLOCK_HW: tl.constexpr):
    """Offsets and mask of unit k = (image k // n_hb, pixel block k % n_hb), and its pixel count."""
    n = k // n_hb
    hw = (k % n_hb) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs = n.to(tl.int64) * s_n + hw.to(tl.int64)[:, None] * s_hw + c_idx.to(tl.int64)[None, :] * s_c
    mask = (hw < HW)[:, None] & (c_idx < C)[None, :]
    count = tl.minimum(HW - (k % n_hb) * BLOCK_HW, BLOCK_HW)
    return offs, mask, count


@triton.jit
def _last_arrival(counter, P):
    """True in the last of the P programs of a channel block to get here; their partials, stored
    before, are then visible to it (a CTA barrier, then an acquire-release atomic at GPU scope)."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel") == P - 1


@triton.jit
def _moments(x_ptr, parts, local, counters, units, n_hb, HW, C, s_n, s_c, s_hw, units_per_prog, P,
             ACC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, RB: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for k in range(p * units_per_prog, tl.minimum((p + 1) * units_per_prog, units)):
        offs, mask, count = _unit_tile(k, n_hb, HW, c_idx, C, s_n, s_c, s_hw, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_t = count.to(ACC)
        mean_t = tl.sum(x, axis=0) / n_t
        d = tl.where(mask, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        # Chan, Golub, LeVeque: (n, mean, M2) merged with the tile's (n_t, mean_t, m2_t).
        total = n + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (n * n_t / total)
        n = total
    out = p * C + c_idx
    keep = c_idx < C
    tl.store(parts + out, n, mask=keep)                    # parts: [3, P, C] = counts, means, M2s
    tl.store(parts + P * C + out, mean, mask=keep)
    tl.store(parts + 2 * P * C + out, m2, mask=keep)
    if _last_arrival(counters + cb, P):
        # New names: Triton's compiler rejects a branch that redefines a variable with another type (fp64 here).
        n_i, m_i, m2_i = _chan_merge(parts, parts + P * C, parts + 2 * P * C, P, C, c_idx, keep, BLOCK_C, RB)
        tl.store(local + 1 + c_idx, m_i, mask=keep)               # packed: n_i, m_i[C], M2_i[C]
        tl.store(local + 1 + C + c_idx, m2_i, mask=keep)
        tl.store(local + c_idx * 0, n_i, mask=c_idx == 0)
        tl.atomic_xchg(counters + cb, 0)                          # zero again for the next launch


@triton.jit
def _chan_merge(cnt_ptr, mean_ptr, m2_ptr, rows, stride, c_idx, keep, BLOCK: tl.constexpr, RB: tl.constexpr):
    """(n, mean, M2) in float64 of ``rows`` parts (row r at offset r * stride + c), RB rows at a time:
    each tile's own (n, mean, M2) by Chan's formula for a set of parts, then merged into the running
    one (a fixed order: deterministic). Parts with n = 0 add nothing."""
    n = tl.zeros([BLOCK], dtype=tl.float64)
    mean = tl.zeros([BLOCK], dtype=tl.float64)
    m2 = tl.zeros([BLOCK], dtype=tl.float64)
    for r0 in range(0, rows, RB):
        r = r0 + tl.arange(0, RB)
        ok = (r < rows)[:, None] & keep[None, :]
        off = r[:, None] * stride + c_idx[None, :]
        # .cg: from L2, never a stale L1 line (other programs wrote these in the same launch)
        n_r = tl.load(cnt_ptr + off, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float64)
        mean_r = tl.load(mean_ptr + off, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float64)
        n_t = tl.sum(n_r, axis=0)
        mean_t = tl.sum(n_r * mean_r, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(ok, mean_r - mean_t[None, :], 0.0)
        m2_r = tl.load(m2_ptr + off, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float64)
        m2_t = tl.sum(m2_r + n_r * d * d, axis=0)
        total = n + n_t
        frac = tl.where(total > 0, n_t / tl.maximum(total, 1.0), 0.0)
        delta = mean_t - mean
        mean += delta * frac
        m2 += m2_t + delta * delta * n * frac
        n = total
    return n, mean, m2


@triton.jit
def _group_stats(parts, G, C, mean_out, var_out, n_out, running_mean, running_var, factor_hi, factor_lo,
                 HAS_RUNNING: tl.constexpr, BLOCK: tl.constexpr, RB: tl.constexpr):
    c_idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = c_idx < C
    row = 2 * C + 1
    # Each part's count sits in column 0 of its row, the same for every channel: the pointers
    # (parts - c) + r * row + c all land on it.
    n, mean, m2 = _chan_merge(parts - c_idx, parts + 1, parts + 1 + C, G, row, c_idx, keep, BLOCK, RB)
    var = m2 / tl.maximum(n, 1.0)
    tl.store(mean_out + c_idx, mean.to(mean_out.dtype.element_ty), mask=keep)
    tl.store(var_out + c_idx, var.to(var_out.dtype.element_ty), mask=keep)
    tl.store(n_out + c_idx * 0, n, mask=c_idx == 0)
    if HAS_RUNNING:
        # Python floats arrive as fp32: the momentum comes in two parts, summed in fp64.
        factor = tl.zeros([BLOCK], dtype=tl.float64) + factor_hi + factor_lo
        rm = tl.load(running_mean + c_idx, mask=keep, other=0.0)
        rv = tl.load(running_var + c_idx, mask=keep, other=0.0)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        tl.store(running_mean + c_idx, (rm * (1 - factor) + mean.to(rm.dtype) * factor).to(rm.dtype), mask=keep)
        tl.store(running_var + c_idx, (rv * (1 - factor) + unbiased.to(rv.dtype) * factor).to(rv.dtype), mask=keep)


@triton.jit
def _backward_reduce(dy_ptr, x_ptr, mean_ptr, var_ptr, eps, sums, counters, packed, dw_out, db_out, units, n_hb, HW,
                     C, s_n, s_c, s_hw, g_n, g_c, g_hw, units_per_prog, P, ACC: tl.constexpr,
                     BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, RB: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c_idx < C
    mean = tl.load(mean_ptr + c_idx, mask=keep, other=0.0).to(ACC)
    acc_dy = tl.zeros([BLOCK_C], dtype=ACC)
    acc_dy_xmu = tl.zeros([BLOCK_C], dtype=ACC)
    for k in range(p * units_per_prog, tl.minimum((p + 1) * units_per_prog, units)):
        offs, mask, _ = _unit_tile(k, n_hb, HW, c_idx, C, s_n, s_c, s_hw, BLOCK_HW)
        g_offs, _, _ = _unit_tile(k, n_hb, HW, c_idx, C, g_n, g_c, g_hw, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        acc_dy += tl.sum(dy, axis=0)
        acc_dy_xmu += tl.sum(tl.where(mask, dy * (x - mean[None, :]), 0.0), axis=0)
    out = p * C + c_idx
    tl.store(sums + out, acc_dy, mask=keep)                 # sums: [2, P, C] = sum dy, sum dy (x - mean)
    tl.store(sums + P * C + out, acc_dy_xmu, mask=keep)
    if _last_arrival(counters + cb, P):
        a = tl.zeros([BLOCK_C], dtype=tl.float64)
        b = tl.zeros([BLOCK_C], dtype=tl.float64)
        for r0 in range(0, P, RB):  # a fixed order: deterministic
            r = r0 + tl.arange(0, RB)
            ok = (r < P)[:, None] & keep[None, :]
            off = r[:, None] * C + c_idx[None, :]
            a += tl.sum(tl.load(sums + off, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float64), axis=0)
            b += tl.sum(tl.load(sums + P * C + off, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float64),
                        axis=0)
        invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c_idx, mask=keep, other=1.0).to(tl.float64) + eps)
        b = b * invstd                                                   # sum dy * x_hat
        tl.store(packed + c_idx, a, mask=keep)
        tl.store(packed + C + c_idx, b, mask=keep)
        tl.store(db_out + c_idx, a.to(db_out.dtype.element_ty), mask=keep)
        tl.store(dw_out + c_idx, b.to(dw_out.dtype.element_ty), mask=keep)
        tl.atomic_xchg(counters + cb, 0)


@triton.jit
def _input_grad(dy_ptr, x_ptr, dx_ptr, total, n_ptr, weight, mean_ptr, var_ptr, eps, units, n_hb, HW, C,
                s_n, s_c, s_hw, g_n, g_c, g_hw, units_per_prog, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    p, cb = tl.program_id(0), tl.program_id(1)
    c_idx = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c_idx < C
    # dx = gamma invstd (dy - mean_g(dy) - x_hat mean_g(dy x_hat)) = a dy + b x + c, per channel.
    n = tl.load(n_ptr)
    mean_dy = (tl.load(total + c_idx, mask=keep, other=0.0) / n).to(ACC)
    mean_dy_xhat = (tl.load(total + C + c_idx, mask=keep, other=0.0) / n).to(ACC)
    mean = tl.load(mean_ptr + c_idx, mask=keep, other=0.0).to(ACC)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c_idx, mask=keep, other=1.0).to(ACC) + eps)
    a = invstd
    if HAS_WEIGHT:
        a = tl.load(weight + c_idx, mask=keep, other=0.0).to(ACC) * invstd
    b = -a * invstd * mean_dy_xhat
    c = -a * mean_dy - b * mean
    for k in range(p * units_per_prog, tl.minimum((p + 1) * units_per_prog, units)):
        offs, mask, _ = _unit_tile(k, n_hb, HW, c_idx, C, s_n, s_c, s_hw, BLOCK_HW)
        g_offs, _, _ = _unit_tile(k, n_hb, HW, c_idx, C, g_n, g_c, g_hw, BLOCK_HW)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        dx = a[None, :] * dy + b[None, :] * x + c[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)   # dx has x's strides


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def local_moments_packed(x: torch.Tensor) -> torch.Tensor:
    """This rank's float64 (n_i, mean_i[C], M2_i[C]) of x: launch 1."""
    pl = plan(x)
    c, acc = x.shape[1], acc_dtype(x)
    parts = torch.empty(3, pl.grid[0], c, device=x.device, dtype=acc)
    local = torch.empty(2 * c + 1, device=x.device, dtype=torch.float64)
    _moments[pl.grid](x, parts, local, counters(x.device, pl.grid[1]), pl.units, pl.n_hb, pl.hw, c, *pl.strides,
                      pl.units_per_prog, pl.grid[0], ACC=_TL[acc], BLOCK_HW=pl.block_hw, BLOCK_C=pl.block_c,
                      RB=MERGE_ROWS)
    return local


def group_stats(parts: torch.Tensor, stat_dtype: torch.dtype, running_mean, running_var, factor: float):
    """Launch 2: mean, biased var (stat_dtype) and n (float64 [1]) of the group's packed parts
    [G, 2C+1]; running statistics updated in place when given."""
    g, row = parts.shape
    c = (row - 1) // 2
    mean = torch.empty(c, device=parts.device, dtype=stat_dtype)
    var = torch.empty_like(mean)
    n = torch.empty(1, device=parts.device, dtype=torch.float64)
    has = running_mean is not None
    _group_stats[(triton.cdiv(c, MERGE_BLOCK),)](parts.contiguous(), g, c, mean, var, n,
                                                 running_mean if has else mean, running_var if has else var,
                                                 *split(factor), HAS_RUNNING=has, BLOCK=MERGE_BLOCK,
                                                 RB=MERGE_ROWS)
    return mean, var, n


def grad_sums_packed(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                     param_dtype: torch.dtype):
    """Launch 3: float64 (sum dy[C], sum dy x_hat[C]) and the local (dgamma, dbeta)."""
    pl = plan(x)
    c, acc = x.shape[1], acc_dtype(x)
    sums = torch.empty(2, pl.grid[0], c, device=x.device, dtype=acc)
    packed = torch.empty(2 * c, device=x.device, dtype=torch.float64)
    # Two tensors, not views of one: they become the parameters' .grad, which must not alias.
    dw, db = (torch.empty(c, device=x.device, dtype=param_dtype) for _ in range(2))
    _backward_reduce[pl.grid](dy, x, mean.contiguous(), var.contiguous(), float(eps), sums,
                              counters(x.device, pl.grid[1]), packed, dw, db, pl.units, pl.n_hb, pl.hw, c,
                              *pl.strides, *strides(dy), pl.units_per_prog, pl.grid[0], ACC=_TL[acc],
                              BLOCK_HW=pl.block_hw, BLOCK_C=pl.block_c, RB=MERGE_ROWS)
    return packed, dw, db


def input_grad(dy: torch.Tensor, x: torch.Tensor, total: torch.Tensor, n: torch.Tensor, weight, mean, var,
               eps: float) -> torch.Tensor:
    """Launch 4: dx from the group sums ``total`` (float64 [2C]) and count ``n`` (float64 [1])."""
    pl = plan(x)
    dx = torch.empty_like(x)  # preserve_format: the same strides as x
    has_weight = weight is not None
    _input_grad[pl.grid](dy, x, dx, total.contiguous(), n, weight if has_weight else mean, mean.contiguous(),
                         var.contiguous(), float(eps), pl.units, pl.n_hb, pl.hw, x.shape[1], *pl.strides, *strides(dy),
                         pl.units_per_prog, HAS_WEIGHT=has_weight, ACC=_TL[acc_dtype(x)], BLOCK_HW=pl.block_hw,
                         BLOCK_C=pl.block_c)
    return dx

"""The (PMD-)LAMB update of every tensor of an optimizer in three Triton launches (Apex's design).

Apex's ``multi_tensor_lamb`` splits the step into two stages around the per-tensor norms; so do we,
over a table of work items (tensor t, block b) that spans all tensors, so that 189 tensors are three
launches, not 3 x 189:

    stage 1, per item:   m <- b1 m + (1 - b1) s g;   v <- b2 v + (1 - b2) (s g)^2      (stored)
                         u  = m bc1 / (sqrt(v bc2) + eps) + wd x                        (not stored)
                         partial sums of x^2 and u^2 of the item
    norms, per tensor:   ||x||, ||u|| from its items' partials (a fixed order: deterministic),
                         f_t = -lr alpha phi,  phi = ||x|| / ||u|| (1 if either is 0 or trust is off)
    stage 2, per item:   u recomputed from the stored m, v and x;   x <- x + f_t u

Bytes per parameter (fp32 x, m, v; g of 4 or 2 bytes): stage 1 reads x g m v and writes m v
(24 B), stage 2 reads x m v and writes x (16 B): 40 B, the memory-bound minimum for an update whose
step size depends on a norm of the update itself (torch's fused AdamW, which has no such norm,
moves 28 B). Recomputing u in stage 2 costs the same bytes as storing it and keeps p.grad intact.

``s`` (gradient clipping) is read from a device tensor, so clipping needs no host sync; a NaN ``s``
(a non-finite gradient norm) turns every store off: the step is skipped on the device.
Tensors come as a table of raw addresses (int64) that the kernels cast to typed pointers.
``group_elems`` runs the three launches per group of consecutive tensors of about that many
elements, so that stage 2 finds stage 1's data in the GPU's L2 cache (measured by
benchmarks/gpu_check.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096          # elements per work item
NUM_WARPS = 8         # 16 elements per thread
RBLOCK = 256          # partials summed per loop trip in the norms kernel
NCOEF = 10            # len(hvdet.ops.lamb.COEFS)


@triton.jit
def _typed(table, index, dtype: tl.constexpr):
    # Every tensor starts 16-byte aligned (accepts() checks): the hint lets Triton emit 16-byte
    # vector loads through an address it only learns at run time.
    return tl.multiple_of(tl.load(table + index), 16).to(tl.pointer_type(dtype))


@triton.jit
def _update_dir(x, m, v, c):
    """u = m bc1 / (sqrt(v bc2) + eps) + wd x, in the reference's order of operations."""
    bc1, bc2 = tl.load(c + 4), tl.load(c + 5)
    eps, wd = tl.load(c + 6), tl.load(c + 7)
    return (m * bc1) / (tl.sqrt(v * bc2) + eps) + x * wd


@triton.jit
def _work_item(pid, item_tensor, item_block, numels, scale_ptr, BLOCK: tl.constexpr):
    """Work item ``pid``: its tensor t, first element, offsets, the tensor's size and the clip factor.
    A NaN factor (a non-finite gradient norm) makes the size 0: nothing is stored, the step is skipped."""
    t = tl.load(item_tensor + pid)
    start = tl.multiple_of(tl.load(item_block + pid).to(tl.int64) * BLOCK, BLOCK)
    scale = tl.load(scale_ptr)
    numel = tl.where(scale == scale, tl.load(numels + t), 0)  # noqa: PLR0124 - x == x is the NaN test
    return t, start, start + tl.arange(0, BLOCK), numel, scale


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    # Full blocks load without a mask: with 16-byte aligned tensors (accepts()) they compile to wide
    # vector loads, which a mask of unknown period (a tensor's size) would split into scalar ones.
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _stage1_block(x_p, g_p, m_p, v_p, offs, mask, c, scale, MASKED: tl.constexpr):
    """Stage 1 on one block: moments stored, (sum x^2, sum u^2) returned."""
    b1, omb1, b2, omb2 = tl.load(c), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3)
    x = _load(x_p, offs, mask, MASKED)
    g = _load(g_p, offs, mask, MASKED).to(tl.float32) * scale
    m = _load(m_p, offs, mask, MASKED) * b1 + g * omb1       # m_t = xi b1 m_{t-1} + (1 - b1) g_t
    v = _load(v_p, offs, mask, MASKED) * b2 + omb2 * g * g   # v_t = xi b2 v_{t-1} + (1 - b2) g_t^2
    _store(m_p, offs, m, mask, MASKED)
    _store(v_p, offs, v, mask, MASKED)
    u = _update_dir(x, m, v, c)                               # u_t = r_t + lambda x_t
    if MASKED:
        u = tl.where(mask, u, 0.0)
    return tl.sum(x * x, axis=0), tl.sum(u * u, axis=0)


@triton.jit
def _stage1(ptrs, n_tensors, numels, coefs, item_tensor, item_block, partials, scale_ptr,
            G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, NCOEF: tl.constexpr):
    pid = tl.program_id(0)
    t, start, offs, numel, scale = _work_item(pid, item_tensor, item_block, numels, scale_ptr, BLOCK)
    x_p, g_p = _typed(ptrs, t, tl.float32), _typed(ptrs, n_tensors + t, G_DTYPE)
    m_p, v_p = _typed(ptrs, 2 * n_tensors + t, tl.float32), _typed(ptrs, 3 * n_tensors + t, tl.float32)
    c = coefs + t * NCOEF
    if start + BLOCK <= numel:
        sum_x, sum_u = _stage1_block(x_p, g_p, m_p, v_p, offs, offs < numel, c, scale, MASKED=False)
    else:
        sum_x, sum_u = _stage1_block(x_p, g_p, m_p, v_p, offs, offs < numel, c, scale, MASKED=True)
    tl.store(partials + 2 * pid, sum_x)
    tl.store(partials + 2 * pid + 1, sum_u)


@triton.jit
def _norms(partials, tensor_first, coefs, factors, norms_out, NCOEF: tl.constexpr, RBLOCK: tl.constexpr):
    t = tl.program_id(0)
    lo, hi = tl.load(tensor_first + t), tl.load(tensor_first + t + 1)
    acc_x = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_u = tl.zeros([RBLOCK], dtype=tl.float32)
    for i in range(lo, hi, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        ok = idx < hi
        acc_x += tl.load(partials + 2 * idx, mask=ok, other=0.0)
        acc_u += tl.load(partials + 2 * idx + 1, mask=ok, other=0.0)
    x_norm, u_norm = tl.sqrt(tl.sum(acc_x, axis=0)), tl.sqrt(tl.sum(acc_u, axis=0))
    step_size, trust = tl.load(coefs + t * NCOEF + 8), tl.load(coefs + t * NCOEF + 9)
    # phi = ||x|| / ||u||; 1 where a norm is 0 (zero-initialized biases) or the group has trust off.
    phi = tl.where((trust != 0) & (x_norm > 0) & (u_norm > 0), x_norm / u_norm, 1.0)
    tl.store(factors + t, -step_size * phi)
    tl.store(norms_out + 2 * t, x_norm)
    tl.store(norms_out + 2 * t + 1, u_norm)


@triton.jit
def _stage2_block(x_p, m_p, v_p, offs, mask, c, factor, MASKED: tl.constexpr):
    x = _load(x_p, offs, mask, MASKED)
    u = _update_dir(x, _load(m_p, offs, mask, MASKED), _load(v_p, offs, mask, MASKED), c)
    _store(x_p, offs, x + u * factor, mask, MASKED)          # x_{t+1} = x_t - lr alpha phi u_t


@triton.jit
def _stage2(ptrs, n_tensors, numels, coefs, item_tensor, item_block, factors, scale_ptr,
            BLOCK: tl.constexpr, NCOEF: tl.constexpr):
    t, start, offs, numel, _ = _work_item(tl.program_id(0), item_tensor, item_block, numels, scale_ptr, BLOCK)
    x_p = _typed(ptrs, t, tl.float32)
    m_p, v_p = _typed(ptrs, 2 * n_tensors + t, tl.float32), _typed(ptrs, 3 * n_tensors + t, tl.float32)
    c, factor = coefs + t * NCOEF, tl.load(factors + t)
    if start + BLOCK <= numel:
        _stage2_block(x_p, m_p, v_p, offs, offs < numel, c, factor, MASKED=False)
    else:
        _stage2_block(x_p, m_p, v_p, offs, offs < numel, c, factor, MASKED=True)


_GDTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_LAYOUTS: dict = {}


def accepts(quad: tuple) -> bool:
    """fp32 contiguous param and moments, an fp32/bf16/fp16 contiguous gradient, one device, every
    tensor 16-byte aligned (true of every tensor that owns its storage)."""
    p, g, m, v = quad
    aligned = not (p.data_ptr() | g.data_ptr() | m.data_ptr() | v.data_ptr()) & 15
    return (aligned and p.dtype is m.dtype is v.dtype is torch.float32 and g.dtype in _GDTYPES
            and all(t.is_contiguous() for t in quad) and g.device == p.device == m.device == v.device)


def _layout(numels: tuple, device) -> tuple:
    """Work items of the tensors (cached: the shapes of an optimizer's tensors do not change)."""
    key = (numels, str(device))
    if key not in _LAYOUTS:
        item_tensor, item_block, first = [], [], [0]
        for t, n in enumerate(numels):
            blocks = max(1, triton.cdiv(n, BLOCK))
            item_tensor += [t] * blocks
            item_block += range(blocks)
            first.append(first[-1] + blocks)
        as_dev = {"device": device, "dtype": torch.int32}
        _LAYOUTS[key] = (torch.tensor(item_tensor, **as_dev), torch.tensor(item_block, **as_dev),
                         torch.tensor(first, **as_dev), torch.tensor(numels, device=device, dtype=torch.int64))
    return _LAYOUTS[key]


class Plan:
    """The launches of one step over fixed tensors: work tables and the address table on the device.

    Building it reads every tensor's address and copies the table to the device; :func:`hvdet.ops.lamb.lamb_step`
    keeps plans while the addresses stay the same (they do, step after step, for an optimizer's
    parameters, moments and, with the caching allocator, its gradients), so a step costs the three
    launches and little Python.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, group_elems: int | None = None):
        self.device = params[0].device
        self.n = len(params)
        self.groups = []
        for lo, hi in _groups([p.numel() for p in params], group_elems):
            tensors = (params[lo:hi], grads[lo:hi], exp_avgs[lo:hi], exp_avg_sqs[lo:hi])
            ptrs = _to_device(torch.tensor([t.data_ptr() for ts in tensors for t in ts], dtype=torch.int64),
                              self.device)
            layout = _layout(tuple(p.numel() for p in params[lo:hi]), self.device)
            self.groups.append((lo, hi, ptrs, layout, _GDTYPES[grads[lo].dtype]))

    def run(self, coefs: torch.Tensor, grad_scale) -> torch.Tensor:
        """Update every tensor in place; returns float64 [n, 2] norms on the device: ||x|| before the
        step and ||u||. ``grad_scale``: a float or a 1-element device tensor."""
        device = self.device
        coefs = _to_device(coefs.to(torch.float32), device)
        if torch.is_tensor(grad_scale):
            scale = grad_scale.reshape(1).to(device=device, dtype=torch.float32)
        else:
            scale = torch.full((1,), float(grad_scale), device=device, dtype=torch.float32)
        norms = torch.empty(self.n, 2, device=device, dtype=torch.float32)
        for lo, hi, ptrs, (item_tensor, item_block, first, numels), gdtype in self.groups:
            n, items = hi - lo, item_tensor.numel()
            partials = torch.empty(items, 2, device=device, dtype=torch.float32)
            factors = torch.empty(n, device=device, dtype=torch.float32)
            rows = coefs[lo:hi]
            _stage1[(items,)](ptrs, n, numels, rows, item_tensor, item_block, partials, scale,
                              G_DTYPE=gdtype, BLOCK=BLOCK, NCOEF=NCOEF, num_warps=NUM_WARPS)
            _norms[(n,)](partials, first, rows, factors, norms[lo:hi], NCOEF=NCOEF, RBLOCK=RBLOCK)
            _stage2[(items,)](ptrs, n, numels, rows, item_tensor, item_block, factors, scale,
                              BLOCK=BLOCK, NCOEF=NCOEF, num_warps=NUM_WARPS)
        return norms.double()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on ``device`` without a host sync: copied from pinned memory (the caching
    host allocator keeps the block until the copy is done)."""
    if device.type != "cuda" or host.device == device:
        return host.contiguous()
    return host.contiguous().pin_memory().to(device, non_blocking=True)


def _groups(numels: list, group_elems: int | None) -> list[tuple[int, int]]:
    if not group_elems:
        return [(0, len(numels))]
    out, lo, total = [], 0, 0
    for i, n in enumerate(numels):
        if total and total + n > group_elems:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    return out + [(lo, len(numels))]

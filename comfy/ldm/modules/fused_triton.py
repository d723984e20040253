"""Triton kernels behind comfy/ldm/modules/fused.py (imported only when a CUDA tensor reaches them).

Module-level so the kernels can call each other: Triton resolves a jitted callee from the caller's
module globals.
"""

import triton
import triton.language as tl


@triton.jit
def row_index(n_rows, n1, n2, BLOCK_R: tl.constexpr):
    """This program's rows of the flattened [n0, n1, n2] leading dims: (mask, i0, i1, i2)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i2 = (rows % n2).to(tl.int64)
    rest = rows // n2
    return rows < n_rows, (rest // n1).to(tl.int64), (rest % n1).to(tl.int64), i2


@triton.jit
def norm_rope_kernel(x_ptr, w_ptr, f_ptr, o_ptr, n_rows, n1, n2, xs0, xs1, xs2, fs0, fs1, fs2,
                          os0, os1, os2, eps, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
                          NORM: tl.constexpr, ROPE: tl.constexpr):
    # whole rows loaded and stored contiguously (vector memory access), the pairs separated in registers:
    # 5.7x faster than loading each pair's two strided elements (3.2 vs 18.4 ms per Flux 1024² step)
    rmask, i0, i1, i2 = row_index(n_rows, n1, n2, BLOCK_R)
    c = tl.arange(0, 2 * HALF)
    m = rmask[:, None]
    x = tl.load(x_ptr + (i0 * xs0 + i1 * xs1 + i2 * xs2)[:, None] + c[None, :], mask=m, other=0.0)
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_R, HALF, 2]))
    if NORM:
        ms = (tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * HALF)
        rstd = 1.0 / tl.sqrt(ms + eps)
        w0, w1 = tl.split(tl.reshape(tl.load(w_ptr + c).to(tl.float32), [HALF, 2]))
        # rounded to the activation dtype, as the separate norm's output is
        x0 = (x0 * rstd[:, None] * w0[None, :]).to(o_ptr.dtype.element_ty).to(tl.float32)
        x1 = (x1 * rstd[:, None] * w1[None, :]).to(o_ptr.dtype.element_ty).to(tl.float32)
    if ROPE:
        c4 = tl.arange(0, 4 * HALF)
        f = tl.load(f_ptr + (i0 * fs0 + i1 * fs1 + i2 * fs2)[:, None] + c4[None, :], mask=m, other=0.0)
        f_a, f_b = tl.split(tl.reshape(f, [BLOCK_R, HALF, 2, 2]))  # [..., r, 0] and [..., r, 1]
        f00, f10 = tl.split(f_a)
        f01, f11 = tl.split(f_b)
        y0 = f00 * x0 + f01 * x1
        y1 = f10 * x0 + f11 * x1
    else:
        y0 = x0
        y1 = x1
    y = tl.reshape(tl.join(y0, y1), [BLOCK_R, 2 * HALF]).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + (i0 * os0 + i1 * os1 + i2 * os2)[:, None] + c[None, :], y, mask=m)


@triton.jit
def layernorm_modulate_kernel(x_ptr, sh_ptr, sc_ptr, o_ptr, n_rows, n1, C, xs0, xs1, shs0, shs1, scs0, scs1,
                              os0, os1, eps, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    # BLOCK_R whole rows of x [n0, n1, C] per program, each read once; shift/scale rows broadcast by stride 0.
    # The roundings are those of F.layer_norm followed by torch.addcmul(shift, normed, 1 + scale).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i0 = (rows // n1).to(tl.int64)
    i1 = (rows % n1).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = (rows < n_rows)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + (i0 * xs0 + i1 * xs1)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(m, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)  # biased variance, as F.layer_norm
    # the norm's output is rounded to the activation dtype, as the separate layer_norm's is
    normed = (d * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    sh = tl.load(sh_ptr + (i0 * shs0 + i1 * shs1)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + (i0 * scs0 + i1 * scs1)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
    one_plus = (sc + 1.0).to(sc_ptr.dtype.element_ty).to(tl.float32)  # `1 + scale` is its own op
    y = tl.fma(normed, one_plus, sh)  # addcmul: float32, one rounding (PyTorch uses fma when value == 1)
    tl.store(o_ptr + (i0 * os0 + i1 * os1)[:, None] + c[None, :], y.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def lse_merge_kernel(o_ptr, l_ptr, y_ptr, n_rows, n1, os0, os1, os2, ls0, ls1, ls2, ys0, ys1,
                     D: tl.constexpr, PARTS: tl.constexpr, BLOCK_R: tl.constexpr):
    # rows are the (head, query) pairs of [n0, n1]; part p's output row is o[p, h, l, :] and its log-sum-exp
    # l[p, h, l]; the merged row y[h, l, :] = sum_p exp(l_p - max) o_p / sum_p exp(l_p - max), in float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    h = (rows // n1).to(tl.int64)
    q = (rows % n1).to(tl.int64)
    c = tl.arange(0, D)
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for p in tl.static_range(PARTS):
        top = tl.maximum(top, tl.load(l_ptr + p * ls0 + h * ls1 + q * ls2, mask=rmask, other=0.0))
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    for p in tl.static_range(PARTS):
        w = tl.exp(tl.load(l_ptr + p * ls0 + h * ls1 + q * ls2, mask=rmask, other=0.0) - top)
        o = tl.load(o_ptr + (p * os0 + h * os1 + q * os2)[:, None] + c[None, :], mask=rmask[:, None], other=0.0)
        acc += w[:, None] * o.to(tl.float32)
        den += w
    y = acc / den[:, None]
    tl.store(y_ptr + (h * ys0 + q * ys1)[:, None] + c[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None])

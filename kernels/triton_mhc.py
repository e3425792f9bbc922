"""Triton kernels for `mhc.hc_pre` / `mhc.hc_post` (semantics there).

hc_pre: one program = BLOCK_T tokens. Pass 1 streams z = flatten(X) once, accumulating the 24
mixing logits (two [BLOCK_T, 16] dots: rows 0..7 of fn = pre/post, rows 8..23 = comb) and sum(z^2);
then the sigmoids and the 20 Sinkhorn iterations run on [BLOCK_T, 4, 4] in registers; pass 2
re-reads X (mostly from L2) for u = sum_j pre_j X_j.
hc_post: elementwise over [4, BLOCK_D] slices of each token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRET, round_bf16


@triton.jit
def _dot_f32(a, b, INTERP: tl.constexpr):
    """fp32 x fp32 with ~fp32 accuracy on tensor cores (3 tf32 products)."""
    if INTERP:
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _pick(x3, idx3, j):
    """x3[:, j, :] of a [T, 4, 4] tile (Triton has no slicing)."""
    return tl.sum(tl.where(idx3 == j, x3, 0.0), 1)


@triton.jit
def _hc_pre_kernel(x_ptr, stride_xn, fn_ptr, stride_fn, scale_ptr, base_ptr, u_ptr, stride_un, post_ptr, comb_ptr,
                   n_tok, d, iters, hc_eps, norm_eps,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tok
    rows = tl.arange(0, 16)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xn
    acc_pp = tl.zeros([BLOCK_T, 16], tl.float32)  # mu[0:8] (pre, post), cols 8..15 unused
    acc_c = tl.zeros([BLOCK_T, 16], tl.float32)  # mu[8:24] (comb, row-major 4x4)
    sumsq = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, 4 * d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < 4 * d
        z = tl.load(x_rows + offs_k[None, :], mask=mask_t[:, None] & mk[None, :], other=0.0).to(tl.float32)
        sumsq += tl.sum(z * z, 1)
        f_pp = tl.load(fn_ptr + rows[:, None] * stride_fn + offs_k[None, :], mask=(rows < 8)[:, None] & mk[None, :],
                       other=0.0)
        f_c = tl.load(fn_ptr + (8 + rows)[:, None] * stride_fn + offs_k[None, :], mask=mk[None, :], other=0.0)
        acc_pp += _dot_f32(z, tl.trans(f_pp), INTERP)
        acc_c += _dot_f32(z, tl.trans(f_c), INTERP)
    rho = tl.rsqrt(sumsq / (4 * d) + norm_eps)

    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    idx3 = tl.arange(0, 4)[None, :, None]  # axis 1 of [T, 4, 4]
    pp = tl.reshape(acc_pp * rho[:, None], (BLOCK_T, 4, 4))  # [T, (pre, post, -, -), 4]
    pp_base = tl.reshape(tl.load(base_ptr + rows, mask=rows < 8, other=0.0), (1, 4, 4))
    pre = tl.sigmoid(_pick(s0 * pp + pp_base, idx3, 0)) + hc_eps  # [T, 4]
    post = 2.0 * tl.sigmoid(_pick(s1 * pp + pp_base, idx3, 1))
    logits = tl.reshape(s2 * acc_c * rho[:, None] + tl.load(base_ptr + 8 + rows)[None, :], (BLOCK_T, 4, 4))

    # Sinkhorn: softmax over k (axis 2) + eps, column normalisation (axis 1), then iters-1 x (row, column)
    c = tl.exp(logits - tl.max(logits, 2)[:, :, None])
    c = c / tl.sum(c, 2)[:, :, None] + hc_eps
    c = c / (tl.sum(c, 1)[:, None, :] + hc_eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, 2)[:, :, None] + hc_eps)
        c = c / (tl.sum(c, 1)[:, None, :] + hc_eps)

    j4 = tl.arange(0, 4)
    tl.store(post_ptr + offs_t[:, None] * 4 + j4[None, :], post, mask=mask_t[:, None])
    tl.store(comb_ptr + offs_t[:, None] * 16 + rows[None, :], tl.reshape(c, (BLOCK_T, 16)), mask=mask_t[:, None])

    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m3 = mask_t[:, None, None] & (offs_d < d)[None, None, :]
        xs = tl.load(x_rows[:, :, None] + j4[None, :, None] * d + offs_d[None, None, :], mask=m3, other=0.0)
        u = tl.sum(pre[:, :, None] * xs.to(tl.float32), 1)
        tl.store(u_ptr + offs_t.to(tl.int64)[:, None] * stride_un + offs_d[None, :], round_bf16(u).to(tl.bfloat16),
                 mask=mask_t[:, None] & (offs_d < d)[None, :])


@triton.jit
def _hc_post_kernel(v_ptr, stride_vn, x_ptr, stride_xn, post_ptr, comb_ptr, out_ptr, stride_on, d,
                    BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d
    j4 = tl.arange(0, 4)
    v = tl.load(v_ptr + n * stride_vn + offs_d, mask=md, other=0.0).to(tl.float32)
    xs = tl.load(x_ptr + n * stride_xn + j4[:, None] * d + offs_d[None, :], mask=md[None, :], other=0.0).to(tl.float32)
    post = tl.load(post_ptr + n * 4 + j4)
    comb = tl.load(comb_ptr + n * 16 + j4[:, None] * 4 + j4[None, :])  # [j, k]
    out = post[:, None] * v[None, :] + tl.sum(comb[:, :, None] * xs[:, None, :], 0)  # [k, D]
    tl.store(out_ptr + n * stride_on + j4[:, None] * d + offs_d[None, :], round_bf16(out).to(tl.bfloat16),
             mask=md[None, :])


def _streams(x: torch.Tensor) -> torch.Tensor:
    """[N, 4, d] with the 4 streams of a token contiguous (one 4d row)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def hc_pre_triton(x, fn, scale, base, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6, *, block_t=16, block_k=256,
                  block_d=256, num_warps=4):
    x = _streams(x)
    n, _, d = x.shape
    u = torch.empty(n, d, device=x.device, dtype=torch.bfloat16)
    post = torch.empty(n, 4, device=x.device, dtype=torch.float32)
    comb = torch.empty(n, 4, 4, device=x.device, dtype=torch.float32)
    if n == 0:
        return u, post, comb
    fn = fn.float().contiguous()
    _hc_pre_kernel[(triton.cdiv(n, block_t),)](
        x, x.stride(0), fn, fn.stride(0), scale.float().contiguous(), base.float().contiguous(), u, u.stride(0),
        post, comb, n, d, sinkhorn_iters, hc_eps, norm_eps,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d, INTERP=INTERPRET, num_warps=num_warps,
    )
    return u, post, comb


def hc_post_triton(v, x, post, comb, *, block_d=1024, num_warps=4):
    x = _streams(x)
    n, _, d = x.shape
    out = torch.empty(n, 4, d, device=x.device, dtype=torch.bfloat16)
    if n == 0:
        return out
    v = v if v.stride(1) == 1 else v.contiguous()
    _hc_post_kernel[(n, triton.cdiv(d, block_d))](
        v, v.stride(0), x, x.stride(0), post.float().contiguous(), comb.float().contiguous(), out, out.stride(0), d,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out

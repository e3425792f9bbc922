"""Triton kernels for `mhc.hc_pre` / `mhc.hc_post` (semantics there).

hc_pre, two launches: (1) the 24 mixing logits and sum(z^2) of z = flatten(X), split over tokens x
K ranges so that even one token fills the GPU (one partial row per split); (2) per token and d-slice:
sum of the partials, sigmoids, the 20 Sinkhorn iterations on the 4x4 matrix, u = sum_j pre_j X_j.
hc_post: elementwise over [4, BLOCK_D] slices of each token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import INTERPRET, dot, num_sms, round_bf16


@triton.jit
def _hc_logits_kernel(x_ptr, stride_xn, fn_ptr, stride_fn, part_ptr, n_tok, k_total, k_per_split,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """part[split, n, 0:24] = fn[:, ks] . z[n, ks]; part[split, n, 24] = sum(z[n, ks]^2) over this
    program's K range ks."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_tok
    rows = tl.arange(0, 32)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_total)
    acc = tl.zeros([BLOCK_T, 32], tl.float32)
    sumsq = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < k_hi
        z = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_xn + offs_k[None, :],
                    mask=mask_t[:, None] & mk[None, :], other=0.0)  # bf16, exact operand
        zf = z.to(tl.float32)
        sumsq += tl.sum(zf * zf, 1)
        f = tl.load(fn_ptr + rows[:, None] * stride_fn + offs_k[None, :], mask=(rows < 24)[:, None] & mk[None, :],
                    other=0.0)
        # fn = hi + lo in bf16 carries ~16 mantissa bits; both products are exact, sums in fp32
        f_hi = f.to(tl.bfloat16)
        f_lo = (f - f_hi.to(tl.float32)).to(tl.bfloat16)
        acc += dot(z, tl.trans(f_hi), INTERP) + dot(z, tl.trans(f_lo), INTERP)
    acc = tl.where(rows[None, :] == 24, sumsq[:, None], acc)
    dst = part_ptr + (tl.program_id(1) * n_tok + offs_t).to(tl.int64)[:, None] * 32 + rows[None, :]
    tl.store(dst, acc, mask=mask_t[:, None])


@triton.jit
def _hc_mix_kernel(x_ptr, stride_xn, part_ptr, n_tok, n_splits, scale_ptr, base_ptr, u_ptr, stride_un, post_ptr,
                   comb_ptr, d, iters, hc_eps, norm_eps, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """Per token: sum the K-split partial logits, sigmoids + Sinkhorn (recomputed by every d-slice
    program, it is tiny), then u[slice] = sum_j pre_j X_j[slice]."""
    n = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    c32 = tl.arange(0, 32)
    mix = tl.sum(tl.load(part_ptr + (sp.to(tl.int64)[:, None] * n_tok + n) * 32 + c32[None, :],
                         mask=(sp < n_splits)[:, None], other=0.0), 0)  # [32]: 24 logits, sum(z^2)
    j4 = tl.arange(0, 4)
    jk = j4[:, None] * 4 + j4[None, :]
    rho = tl.rsqrt(tl.sum(tl.where(c32 == 24, mix, 0.0), 0) / (4 * d) + norm_eps)
    mu = mix * rho
    pre_mu = tl.sum(tl.where(c32[None, :] == j4[:, None], mu[None, :], 0.0), 1)  # mu[0:4]
    pre = tl.sigmoid(tl.load(scale_ptr) * pre_mu + tl.load(base_ptr + j4)) + hc_eps
    comb_mu = tl.sum(tl.where(c32[None, None, :] == 8 + jk[:, :, None], mu[None, None, :], 0.0), 2)  # mu[8:24]
    logits = tl.load(scale_ptr + 2) * comb_mu + tl.load(base_ptr + 8 + jk)
    if tl.program_id(1) == 0:
        post_mu = tl.sum(tl.where(c32[None, :] == 4 + j4[:, None], mu[None, :], 0.0), 1)  # mu[4:8]
        post = 2.0 * tl.sigmoid(tl.load(scale_ptr + 1) * post_mu + tl.load(base_ptr + 4 + j4))
        # Sinkhorn: softmax over k + eps, column normalisation, then iters-1 x (row, column)
        c = tl.exp(logits - tl.max(logits, 1)[:, None])
        c = c / tl.sum(c, 1)[:, None] + hc_eps
        c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        for _ in range(iters - 1):
            c = c / (tl.sum(c, 1)[:, None] + hc_eps)
            c = c / (tl.sum(c, 0)[None, :] + hc_eps)
        tl.store(post_ptr + n * 4 + j4, post)
        tl.store(comb_ptr + n * 16 + jk, c)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d
    xs = tl.load(x_ptr + n * stride_xn + j4[:, None] * d + offs_d[None, :], mask=md[None, :], other=0.0)
    u = tl.sum(pre[:, None] * xs.to(tl.float32), 0)
    tl.store(u_ptr + n * stride_un + offs_d, round_bf16(u).to(tl.bfloat16), mask=md)


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


def hc_pre_triton(x, fn, scale, base, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6, *, block_t=None, block_k=256,
                  block_d=1024):
    x = _streams(x)
    n, _, d = x.shape
    u = torch.empty(n, d, device=x.device, dtype=torch.bfloat16)
    post = torch.empty(n, 4, device=x.device, dtype=torch.float32)
    comb = torch.empty(n, 4, 4, device=x.device, dtype=torch.float32)
    if n == 0:
        return u, post, comb
    fn = fn.float().contiguous()
    if block_t is None:  # wide token tiles reuse each fn tile more (prefill); small ones split K more
        block_t = 64 if n >= 1024 else 16
    n_tiles = triton.cdiv(n, block_t)
    # about two waves of programs: K splits add parallelism when there are few tokens
    k_splits = max(1, min(triton.cdiv(4 * d, block_k), (2 * num_sms(x.device)) // n_tiles))
    k_per_split = triton.cdiv(triton.cdiv(4 * d, k_splits), block_k) * block_k
    k_splits = triton.cdiv(4 * d, k_per_split)
    part = torch.empty(k_splits, n, 32, device=x.device, dtype=torch.float32)  # 24 logits, sum(z^2), pad
    _hc_logits_kernel[(n_tiles, k_splits)](
        x, x.stride(0), fn, fn.stride(0), part, n, 4 * d, k_per_split,
        BLOCK_T=block_t, BLOCK_K=block_k, INTERP=INTERPRET, num_warps=4,
    )
    _hc_mix_kernel[(n, triton.cdiv(d, block_d))](
        x, x.stride(0), part, n, k_splits, scale.float().contiguous(), base.float().contiguous(), u, u.stride(0),
        post, comb, d, sinkhorn_iters, hc_eps, norm_eps, BLOCK_D=block_d, SPLITS=triton.next_power_of_2(k_splits),
        num_warps=4,
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

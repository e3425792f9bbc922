"""mHC mixing of the 4 residual streams (spec §3.3): `hc_pre` (with Sinkhorn) and `hc_post`.

hc_pre, per token with streams X [4, d] (bf16), parameters fn [24, 4d], base [24], scale [3] (fp32):
    z = flatten(X);  mu = (fn . z) / sqrt(mean(z^2) + norm_eps)
    pre_j  = sigmoid(scale0 mu_j + base_j) + hc_eps                   j < 4
    post_k = 2 sigmoid(scale1 mu_{4+k} + base_{4+k})
    comb   = Sinkhorn(scale2 mu_{8+4j+k} + base_{8+4j+k})             [4, 4], ends column-normalised
    u      = bf16(sum_j pre_j X_j)
hc_post: X'_k = bf16(post_k v + sum_j comb_jk X_j).
"""

from __future__ import annotations

import torch

from .dispatch import use_triton

N_HC = 4


def sinkhorn_ref(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp of §3.3 step 6 on [..., 4, 4] logits (rows j, columns k), fp32."""
    c = logits.float().softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def _check_pre(x, fn, scale, base) -> None:
    if x.dim() != 3 or x.shape[1] != N_HC:
        raise ValueError(f"x: expected [tokens, {N_HC}, d], got {tuple(x.shape)}")
    mix = (2 + N_HC) * N_HC
    if fn.shape != (mix, N_HC * x.shape[2]):
        raise ValueError(f"fn: expected [{mix}, {N_HC * x.shape[2]}], got {tuple(fn.shape)}")
    if scale.shape != (3,) or base.shape != (mix,):
        raise ValueError(f"scale/base: expected [3] and [{mix}], got {tuple(scale.shape)}, {tuple(base.shape)}")


def hc_pre_ref(x, fn, scale, base, sinkhorn_iters: int = 20, hc_eps: float = 1e-6, norm_eps: float = 1e-6):
    """fp32 reference of `hc_pre`: (u [N, d] bf16, post [N, 4] fp32, comb [N, 4, 4] fp32)."""
    z = x.flatten(1).float()
    mu = (z @ fn.float().T) * torch.rsqrt(z.square().mean(-1, keepdim=True) + norm_eps)  # [N, 24]
    base = base.float()
    pre = torch.sigmoid(scale[0] * mu[:, :N_HC] + base[:N_HC]) + hc_eps
    post = 2 * torch.sigmoid(scale[1] * mu[:, N_HC : 2 * N_HC] + base[N_HC : 2 * N_HC])
    comb = sinkhorn_ref((scale[2] * mu[:, 2 * N_HC :] + base[2 * N_HC :]).unflatten(-1, (N_HC, N_HC)),
                        sinkhorn_iters, hc_eps)
    u = (pre[:, :, None] * x.float()).sum(1).to(torch.bfloat16)
    return u, post, comb


def hc_post_ref(v: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """fp32 reference of `hc_post`: [N, 4, d] bf16."""
    mixed = post.float()[:, :, None] * v.float()[:, None, :] + torch.einsum("njk,njd->nkd", comb.float(), x.float())
    return mixed.to(torch.bfloat16)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, sinkhorn_iters: int = 20,
           hc_eps: float = 1e-6, norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, 4, d] bf16 streams -> (u [N, d] bf16, post [N, 4] fp32, comb [N, 4, 4] fp32)."""
    _check_pre(x, fn, scale, base)
    if use_triton(x, fn):
        from .triton_mhc import hc_pre_triton

        return hc_pre_triton(x, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps)
    return hc_pre_ref(x, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps)


def hc_post(v: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """v [N, d] sublayer output, x [N, 4, d] old streams, post [N, 4], comb [N, 4, 4] -> new streams [N, 4, d]."""
    n = x.shape[0]
    if x.dim() != 3 or x.shape[1] != N_HC or v.shape != (n, x.shape[2]):
        raise ValueError(f"v/x: expected [N, d] and [N, {N_HC}, d], got {tuple(v.shape)}, {tuple(x.shape)}")
    if post.shape != (n, N_HC) or comb.shape != (n, N_HC, N_HC):
        raise ValueError(f"post/comb: expected [{n}, 4] and [{n}, 4, 4], got {tuple(post.shape)}, {tuple(comb.shape)}")
    if use_triton(v, x):
        from .triton_mhc import hc_post_triton

        return hc_post_triton(v, x, post, comb)
    return hc_post_ref(v, x, post, comb)

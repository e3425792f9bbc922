"""Functional building blocks of DeepSeek-V4, plain PyTorch (the CPU / reference path).

Every function here is a pure function of its tensor arguments with the shapes given in its docstring;
the modules in ``model.py`` only hold weights and call these. The hot ops a kernel may replace are

* :func:`compress_blocks`        - compressor entry formation (pooling, norm, RoPE, FP8 / Hadamard + FP4),
* :func:`indexer_scores` / :func:`indexer_topk` - lightning-indexer scoring and top-k selection,
* :func:`sparse_attention`       - attention over gathered keys (window + selected entries) with sink,
* :func:`hc_pre` / :func:`hc_post` - the mHC residual mixing.

Each of these runs the Triton kernel of `dsv4_agent.kernels` where its one switch (env ``DSV4_KERNELS`` =
auto | triton | torch; auto = CUDA tensors) picks it and the kernel reproduces the numerics asked for (bf16
activations; the compressor also the KV simulations), else its PyTorch body here. The fp32 modes therefore
always run PyTorch, except the top-k selection (same set up to exact ties).

Numerics follow spec sections 2-5. Where the reference rounds to bf16, these functions round to
``act_dtype`` (``torch.bfloat16`` in the released precision, ``torch.float32`` in the fp32 modes, where the
rounding is therefore the identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# re-exported names (FP*_MAX, hadamard, rope_cis, ...) keep `ops` the model's one namespace of numerics
from dsv4_agent.kernels.numerics import (  # noqa: F401
    FP4_MAX,
    FP8_MAX,
    apply_rope,
    exp2i,
    fp4_block_scale_exponent,
    fp4_fake_quant,
    fp8_block_scale_exponent,
    fp8_fake_quant,
    fp8_quant,
    hadamard_matrix,
    kv_fp8_sim,
    pow2_ceil,
    rms_norm,
    rope_cis,
)
from dsv4_agent.kernels.numerics import hadamard_rotate as hadamard  # noqa: F401

from .config import FP8_WEIGHT_BLOCK

# e2m1 code values in code-index order; code bit 3 is the sign (the packed FP4 weight format).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Numerics:
    """How a forward pass rounds (the modes of conformance/model/README.md)."""

    act_dtype: torch.dtype  # where the reference holds bf16 activations
    kv_sim: bool  # FP8 simulation of KV vectors / main entries, FP4 simulation of indexer q and keys
    act_quant: bool  # FP8 (block 128) activation quantization before every FP8 / FP4 linear
    bf16_probs: bool  # attention probabilities rounded to bf16 before the value product

    @staticmethod
    def from_mode(mode: str) -> Numerics:
        try:
            return _MODES[mode]
        except KeyError:
            raise ValueError(f"unknown numerics mode {mode!r}; expected one of {sorted(_MODES)}") from None


_MODES = {
    "fp32": Numerics(torch.float32, kv_sim=False, act_quant=False, bf16_probs=False),
    "fp32_sim": Numerics(torch.float32, kv_sim=True, act_quant=False, bf16_probs=False),
    "quant": Numerics(torch.bfloat16, kv_sim=True, act_quant=True, bf16_probs=True),
}


def _triton(*tensors: torch.Tensor):
    """`dsv4_agent.kernels` when its dispatch switch (env DSV4_KERNELS, default: CUDA tensors) picks the
    Triton kernels for these tensors, else None: the functions below then run their PyTorch bodies."""
    from dsv4_agent import kernels

    return kernels if kernels.use_triton(*tensors) else None


def _dot_tileable(*dims: int) -> bool:
    """Dims a Triton kernel can tile for tl.arange / tl.dot: powers of two, at least 16."""
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


# ---------------------------------------------------------------------------------------------------------
# Quantizers (spec 2.3, 2.4, 2.6) and weight dequantization (spec 7)
# ---------------------------------------------------------------------------------------------------------
# The block quantizers, RMSNorm, RoPE and Hadamard are the shared ones of `dsv4_agent.kernels.numerics`
# (one implementation for the model and the kernels' references). The model's wrappers below only keep its
# convention that a simulation returns the dtype it was given (fp32 in the fp32_sim mode; the values are
# bf16-representable either way, the kernels' versions return bf16).
def fp8_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """Power-of-two e4m3 scales of ``x`` [..., n] per block of ``block`` along the last dim -> fp32 [..., n/block]."""
    return exp2i(fp8_block_scale_exponent(x, block))


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activation quantization (spec 2.6): x [..., n] -> (q float8_e4m3fn [..., n], s float8_e8m0fnu [..., n/block])."""
    q, exponent = fp8_quant(x, block)
    return q, exp2i(exponent).to(torch.float8_e8m0fnu)


def fp8_sim(x: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 e4m3 fake quantization (spec 2.3): x [..., n] -> same shape and dtype."""
    return fp8_fake_quant(x, block).to(x.dtype)


def fp4_scales(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Power-of-two e2m1 scales of ``x`` [..., n] per block along the last dim -> fp32 [..., n/block]."""
    return exp2i(fp4_block_scale_exponent(x, block))


def fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 fake quantization (spec 2.4): x [..., n] -> same shape and dtype, ties to the even code."""
    return fp4_fake_quant(x, block).to(x.dtype)


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor, block: int = 128,
                       offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """w float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/block), ceil(in/block)] -> fp32 [out, in].

    A tensor-parallel shard may start inside a scale block: ``offset`` = (row, column) of ``w[0, 0]`` within the
    block of ``scale[0, 0]`` (the scale then covers the blocks the shard touches).
    """
    out, inp = w.shape
    r, c = offset
    s = scale.float().repeat_interleave(block, 0)[r:r + out].repeat_interleave(block, 1)[:, c:c + inp]
    return w.float() * s


def unpack_fp4(w: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 int8 [out, in/2] (low nibble = even column) -> fp32 code values [out, in]."""
    b = w.view(torch.uint8).int()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(w.shape[0], -1)
    mag = torch.tensor(FP4_VALUES, dtype=torch.float32, device=w.device)[codes & 7]
    return torch.where(codes & 8 != 0, -mag, mag)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_fp4`: fp32 [out, in] holding e2m1 values -> int8 [out, in/2]."""
    grid = torch.tensor(FP4_VALUES, dtype=torch.float32)
    idx = (values.abs()[..., None] == grid).int().argmax(-1)
    if not torch.equal(grid[idx], values.abs()):
        raise ValueError("pack_fp4: values are not on the e2m1 grid")
    codes = (idx | torch.where(torch.signbit(values), 8, 0)).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8)


def dequant_fp4_weight(w: torch.Tensor, scale: torch.Tensor, block: int = 32, offset: int = 0) -> torch.Tensor:
    """w int8 [out, in/2] packed e2m1, scale float8_e8m0fnu [out, in/block] -> fp32 [out, in]; ``offset`` = column
    of ``w``'s first logical column within the block of ``scale[:, 0]`` (a shard starting inside a block)."""
    values = unpack_fp4(w)
    return values * scale.float().repeat_interleave(block, 1)[:, offset:offset + values.shape[1]]


FP4_WEIGHT_BLOCK = 32  # released FP4 scale granularity (FP8: FP8_WEIGHT_BLOCK x FP8_WEIGHT_BLOCK blocks)
_STORED_DTYPES = {"fp8": torch.float8_e4m3fn, "fp4": torch.int8, "bf16": torch.bfloat16}


def stored_weight_shapes(out: int, inp: int, stored: str) -> tuple[tuple[tuple[int, ...], torch.dtype],
                                                                    tuple[tuple[int, ...], torch.dtype] | None]:
    """Shapes / dtypes of a linear's (weight, scale) as stored ("fp8", "fp4", "bf16": no scale) for W [out, in]."""
    if stored not in _STORED_DTYPES:
        raise ValueError(f"unknown stored weight format {stored!r}; expected one of {sorted(_STORED_DTYPES)}")
    if stored == "fp8":
        b = FP8_WEIGHT_BLOCK
        return ((out, inp), torch.float8_e4m3fn), ((-(-out // b), -(-inp // b)), torch.float8_e8m0fnu)
    if stored == "fp4":
        return ((out, inp // 2), torch.int8), ((out, -(-inp // FP4_WEIGHT_BLOCK)), torch.float8_e8m0fnu)
    return ((out, inp), torch.bfloat16), None


def dequant_weight(w: torch.Tensor, scale: torch.Tensor | None, stored: str,
                   offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """A stored linear weight (:func:`stored_weight_shapes`) -> fp32 [out, in], exactly. ``offset`` as in
    :func:`dequant_fp8_weight` (FP4 uses its column)."""
    if stored == "fp8":
        return dequant_fp8_weight(w, scale, FP8_WEIGHT_BLOCK, offset)
    if stored == "fp4":
        return dequant_fp4_weight(w, scale, FP4_WEIGHT_BLOCK, offset[1])
    return w.float()


# ---------------------------------------------------------------------------------------------------------
# RoPE frequencies (spec 2.2); rotation, RMSNorm and Hadamard are imported from the kernels' numerics
# ---------------------------------------------------------------------------------------------------------
def rope_frequencies(rope_dim: int, base: float, yarn: tuple[int, float, float, float] | None) -> torch.Tensor:
    """Per-pair rotary frequencies theta'_i, fp32 [rope_dim/2] (spec 2.2).

    ``yarn`` = (original_seq_len, factor, beta_fast, beta_slow) or None for plain RoPE.
    """
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is not None:
        original_len, factor, beta_fast, beta_slow = yarn

        def correction_dim(n_rot: float) -> float:
            return rope_dim * math.log(original_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(beta_fast)), 0)
        hi = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp
        freqs = freqs / factor * (1 - keep) + freqs * keep
    return freqs


def rope_tail(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE on the last ``2 * len(freqs)`` dims of x [n, ..., D] at positions [n]; the leading dims pass through."""
    return apply_rope(x, positions.view(-1, *([1] * (x.dim() - 2))), freqs, inverse)


# ---------------------------------------------------------------------------------------------------------
# Linear layers (spec 2.6)
# ---------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, gemm: str, num: Numerics) -> torch.Tensor:
    """y = x @ W^T for x [..., in], W fp32 [out, in] (already dequantized).

    ``gemm`` is the precision the reference multiplies in: "fp8" / "fp4" (quantized GEMM: activation
    FP8-quantized in blocks of 128, fp32 accumulation, output ``act_dtype``), "bf16" (bf16 GEMM) or "fp32".
    In the fp32 modes every kind is a plain fp32 matmul.
    """
    if num.act_dtype == torch.float32 and not num.act_quant:
        return F.linear(x.float(), weight)
    if gemm in ("fp8", "fp4"):
        xq = fp8_sim(x, 128).float() if num.act_quant else x.float()
        return F.linear(xq, weight).to(num.act_dtype)
    if gemm == "bf16":
        return F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).to(num.act_dtype)
    return F.linear(x.float(), weight)


# ---------------------------------------------------------------------------------------------------------
# mHC residual streams (spec 3.3, 3.4)
# ---------------------------------------------------------------------------------------------------------
def hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """Dynamic mixing logits mu = (fn . z) / rms(z): streams x [n, hc, d], fn fp32 [m, hc*d] -> fp32 [n, m]."""
    z = x.flatten(1).float()
    return F.linear(z, fn) * torch.rsqrt(z.square().mean(-1, keepdim=True) + norm_eps)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes fp32 [n, (2+hc)*hc] -> pre [n, hc], post [n, hc], comb [n, hc, hc] (comb[j, k]: old j -> new k)."""
    pre = torch.sigmoid(scale[0] * mixes[:, :hc] + base[:hc]) + eps
    post = 2 * torch.sigmoid(scale[1] * mixes[:, hc:2 * hc] + base[hc:2 * hc])
    logits = (scale[2] * mixes[:, 2 * hc:] + base[2 * hc:]).view(-1, hc, hc)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *, norm_eps: float,
           hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams x [n, hc, d] -> (sublayer input u [n, d] in x.dtype, post [n, hc], comb [n, hc, hc])."""
    if x.dtype == torch.bfloat16 and x.shape[1] == 4 and (kernels := _triton(x)) is not None:
        return kernels.hc_pre(x, fn, scale, base, iters, hc_eps, norm_eps)
    pre, post, comb = hc_split_sinkhorn(hc_mixes(x, fn, norm_eps), scale, base, x.shape[1], iters, hc_eps)
    u = (pre[..., None] * x.float()).sum(1)
    return u.to(x.dtype), post, comb


def hc_post(v: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams X'_k = post_k v + sum_j comb[j, k] X_j: v [n, d], x [n, hc, d] -> [n, hc, d] in x.dtype."""
    if x.dtype == v.dtype == torch.bfloat16 and x.shape[1] == 4 and (kernels := _triton(v, x)) is not None:
        return kernels.hc_post(v, x, post, comb)
    y = post[..., None] * v.float()[:, None, :] + (comb[..., None] * x.float()[:, :, None, :]).sum(1)
    return y.to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    """Collapse streams x [n, hc, d] -> [n, d] with sigmoid weights (spec 3.4)."""
    w = torch.sigmoid(scale[0] * hc_mixes(x, fn, norm_eps) + base) + hc_eps
    return (w[..., None] * x.float()).sum(1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Attention pieces (spec 4.4 - 4.6)
# ---------------------------------------------------------------------------------------------------------
def compress_entries(kv: torch.Tensor, score: torch.Tensor, kv_prev: torch.Tensor | None = None,
                     score_prev: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax-gated pooling of blocks into compressed entries (before norm / RoPE), fp32.

    kv, score: [nb, m, k*c] candidate content and gate logits (``ape`` already added) of each block's tokens.
    Plain (HCA, k = 1): entry[j] = sum_t softmax_t(score[t, j]) kv[t, j]       -> [nb, c].
    Overlap (CSA, k = 2, ``kv_prev`` / ``score_prev`` [nb, m, 2c] = the previous block's tokens, score -inf
    where the block has no predecessor): candidates are the previous block's first halves and the own
    block's second halves                                                       -> [nb, c].
    """
    if kv_prev is None:
        kv_c, score_c = kv.float(), score.float()
    else:
        c = kv.shape[-1] // 2
        kv_c = torch.cat([kv_prev[..., :c], kv[..., c:]], dim=1).float()
        score_c = torch.cat([score_prev[..., :c], score[..., c:]], dim=1).float()
    return (torch.softmax(score_c, dim=1) * kv_c).sum(1)


def compress_blocks(kv_rows: torch.Tensor, score_rows: torch.Tensor, lo: int, start: int, ratio: int,
                    norm_weight: torch.Tensor, eps: float, freqs: torch.Tensor, rotate: bool,
                    num: Numerics) -> torch.Tensor:
    """The compressed entries (spec 4.4) completed by new tokens at positions ``[start, lo + L)``.

    kv_rows / score_rows [L, k*c] fp32: raw rows (content, gate logits incl. ``ape``) of positions
    ``[lo, lo + L)``, from the first token of the first block to complete (overlap: of the block before it).
    Each entry: softmax-gated pooling (:func:`compress_entries`), ``act_dtype``, RMSNorm, RoPE of the last
    ``2 * len(freqs)`` dims at the block's first position, then with ``num.kv_sim`` FP8 of the other dims
    (main entries) or, with ``rotate`` (indexer keys), Hadamard and FP4 -> [nb, c] in ``act_dtype``.
    """
    m, overlap = ratio, ratio == 4
    first, end = start // m, (lo + kv_rows.shape[0]) // m
    nb = max(end - first, 0)
    c = kv_rows.shape[1] // (2 if overlap else 1)
    if nb and (kernels := _compressor_kernels(c, m, freqs, num, kv_rows)) is not None:
        return _compress_blocks_triton(kernels, kv_rows, score_rows, lo, start, m, norm_weight, eps, freqs, rotate)
    a, b = m * first - lo, m * end - lo  # rows of the completed blocks
    cur_kv = kv_rows[a:b].view(nb, m, -1)
    cur_score = score_rows[a:b].view(nb, m, -1)
    if overlap:
        if first == 0:  # block 0 has no predecessor: its candidates get score -inf
            head_kv = torch.zeros_like(cur_kv[:1])
            head_score = torch.full_like(cur_score[:1], float("-inf"))
        else:
            head_kv = kv_rows[a - m:a].view(1, m, -1)
            head_score = score_rows[a - m:a].view(1, m, -1)
        pooled = compress_entries(cur_kv, cur_score, torch.cat([head_kv, cur_kv[:-1]]),
                                  torch.cat([head_score, cur_score[:-1]]))
    else:
        pooled = compress_entries(cur_kv, cur_score)
    entries = rms_norm(pooled.to(num.act_dtype), norm_weight, eps, num.act_dtype)
    entries = rope_tail(entries, torch.arange(first, end, device=kv_rows.device) * m, freqs)
    if rotate:
        entries = hadamard(entries)
        if num.kv_sim:
            entries = fp4_sim(entries, 32)
    elif num.kv_sim:
        entries = kv_fp8_sim(entries, 2 * freqs.numel())
    return entries


def _compressor_kernels(c: int, m: int, freqs: torch.Tensor, num: Numerics, x: torch.Tensor):
    """`dsv4_agent.kernels` where the fused compressor kernel serves this call, else None. The kernel always
    rounds to bf16 and quantizes, so it serves only the released numerics (act_dtype bf16, kv_sim); it tiles
    power-of-two widths and ratios, and its FP8 blocks of 64 need whole blocks of rope dims."""
    rope = 2 * freqs.numel()
    if not (num.act_dtype == torch.bfloat16 and num.kv_sim and _dot_tileable(c) and c >= 64 and m & (m - 1) == 0
            and rope % 64 == 0 and rope < c):
        return None
    return _triton(x)


def _compress_blocks_triton(kernels, kv_rows: torch.Tensor, score_rows: torch.Tensor, lo: int, start: int, m: int,
                            norm_weight: torch.Tensor, eps: float, freqs: torch.Tensor,
                            rotate: bool) -> torch.Tensor:
    """:func:`compress_blocks` through `kernels.compress_tokens` (one sequence in state slot 0, one entry per
    page: entry i of the sequence on page i - start // m, i.e. row i - start // m of the output)."""
    kc, dev = kv_rows.shape[1], kv_rows.device
    c = kc // (2 if m == 4 else 1)
    first, end, n = start // m, (lo + kv_rows.shape[0]) // m, lo + kv_rows.shape[0] - start
    ring_kv = kv_rows.new_zeros(1, kc // c * m, kc)  # the partial state: position t in row t % (k*m)
    ring_score = torch.zeros_like(ring_kv)
    old = torch.arange(lo, start, device=dev) % ring_kv.shape[1]
    ring_kv[0, old], ring_score[0, old] = kv_rows[:start - lo].float(), score_rows[:start - lo].float()
    out = torch.empty(end - first, 1, c, dtype=torch.bfloat16, device=dev)
    page_table = (torch.arange(end, device=dev) - first).clamp_min(0).int()[None]
    i32 = dict(dtype=torch.int32, device=dev)
    ape = torch.zeros(m, kc, device=dev)  # the rows' scores already include ape; adding 0 is exact
    kernels.compress_tokens(kv_rows[start - lo:].float().contiguous(), score_rows[start - lo:].float().contiguous(),
                            ape, norm_weight, freqs, torch.tensor([0, n], **i32), torch.tensor([start], **i32),
                            ring_kv, ring_score, torch.zeros(1, **i32), out, page_table, m, indexer=rotate, eps=eps,
                            max_seqlen=n)
    return out[:, 0]


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """score[t, i] = sum_h weights[t, h] * relu(q[t, h] . keys[i]).

    q [n, H_I, D_I], weights [n, H_I], keys [N, D_I] -> [n, N] (fp32 values; each step rounded to
    ``act_dtype`` like the reference's bf16 tensors).
    """
    n, H, D = q.shape
    N = keys.shape[0]
    if (act_dtype == q.dtype == keys.dtype == torch.bfloat16 and n and N and _dot_tileable(H, D)
            and (kernels := _triton(q, keys)) is not None):
        # kernel layout: `keys` as a single page of N entries, every entry available (top-k masks later)
        zeros = torch.zeros(n, dtype=torch.int32, device=q.device)
        return kernels.indexer_scores(q.contiguous(), weights.contiguous(), keys.contiguous()[None], zeros[:1, None],
                                      zeros, zeros + N, N, bf16_intermediates=True)
    dots = torch.einsum("nhd,kd->nhk", q.float(), keys.float()).to(act_dtype)
    return (torch.relu(dots) * weights.to(act_dtype)[..., None]).sum(1).float()


def indexer_topk(scores: torch.Tensor, n_avail: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k compressed entries per query: scores [n, N], n_avail [n] (entries i < n_avail[t] exist)
    -> indices int64 [n, min(topk, N)], -1 where fewer than k entries are available."""
    n, N = scores.shape
    k = min(topk, N)
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=scores.device)
    if (kernels := _triton(scores)) is not None:  # same set, unordered (exact ties broken arbitrarily)
        return kernels.topk_indices(scores.float().contiguous(), n_avail.int(), k).long()
    avail = torch.arange(N, device=scores.device)[None, :] < n_avail[:, None]
    val, idx = scores.masked_fill(~avail, float("-inf")).topk(k, dim=-1)
    return torch.where(torch.isneginf(val), -1, idx)


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                     bf16_probs: bool) -> torch.Tensor:
    """Single-KV-head attention over a per-query key list with an attention sink.

    q [n, H, D]; kv [N, D] (keys = values); idx int64 [n, K] rows of ``kv`` each query attends to, -1 = none;
    sink [H] fp32 logit of a zero-valued extra key that joins the denominator but not the max.
    Returns o [n, H, D] in q.dtype: o_h = sum_u e^(l_hu - M_h) v_u / (sum_u e^(l_hu - M_h) + e^(sink_h - M_h)).
    """
    n, H, D = q.shape
    if n == 0:
        return q.new_zeros(n, H, D)
    if (bf16_probs and q.dtype == kv.dtype == torch.bfloat16 and kv.shape[0] > 0
            and (kernels := _triton(q, kv)) is not None):
        # kernel layout: no window range, `kv` as a single page addressed directly by `idx`
        zeros = torch.zeros(n, dtype=torch.int32, device=q.device)
        return kernels.sparse_attn(q, sink.float(), kv, zeros, zeros, kv[None], zeros[:1, None], idx.int(), zeros,
                                   scale)
    valid = idx >= 0
    keys = kv[idx.clamp_min(0)].float()  # [n, K, D]
    logits = torch.einsum("nhd,nkd->nhk", q.float(), keys) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    if bf16_probs:
        return _online_softmax_bf16(logits, keys, sink).to(q.dtype)
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # a query with no key: only the sink
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink.float()[None, :, None] - m)
    o = torch.einsum("nhk,nkd->nhd", p, keys) / denom
    return o.to(q.dtype)


def _online_softmax_bf16(logits: torch.Tensor, keys: torch.Tensor, sink: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The official kernel's numerics: online softmax over blocks of ``block`` keys in list order, probabilities
    rounded to bf16 before the value product, fp32 running max / denominator. logits [n, H, K] -> [n, H, D]."""
    n, H, K = logits.shape
    m = logits.new_full((n, H, 1), float("-inf"))
    denom = logits.new_zeros(n, H, 1)
    acc = logits.new_zeros(n, H, keys.shape[-1])
    for b in range(0, K, block):
        lb = logits[..., b:b + block]
        m_new = torch.maximum(m, lb.amax(-1, keepdim=True))
        safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - safe)
        p = torch.exp(lb - safe)
        denom = denom * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.einsum("nhk,nkd->nhd", p.to(torch.bfloat16).float(), keys[:, b:b + block])
        m = m_new
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return acc / (denom + torch.exp(sink.float()[None, :, None] - safe))


# ---------------------------------------------------------------------------------------------------------
# MoE (spec 5)
# ---------------------------------------------------------------------------------------------------------
def route(gate_logits: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None, topk: int,
          route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits fp32 [n, E] -> (weights fp32 [n, k], experts int64 [n, k]).

    sigma = sqrt(softplus(u)); selection = top-k of sigma + bias (score routing) or ``hash_experts`` [n, k]
    (hash routing); weights = sigma of the selected experts, renormalized, times ``route_scale``.
    """
    sigma = torch.sqrt(F.softplus(gate_logits.float()))
    if hash_experts is not None:
        experts = hash_experts.long()
    else:
        experts = (sigma + bias).topk(topk, dim=-1).indices
    w = sigma.gather(-1, experts)
    return w / w.sum(-1, keepdim=True) * route_scale, experts


def swiglu(a: torch.Tensor, c: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(a, limit)) * clamp(c, -limit, limit) in fp32 (the SwiGLU clamp of spec 5.2); limit 0 = no clamp."""
    a, c = a.float(), c.float()
    if limit > 0:
        a, c = a.clamp(max=limit), c.clamp(-limit, limit)
    return F.silu(a) * c

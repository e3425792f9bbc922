"""Lightning-indexer scoring and top-k selection (spec §4.5).

For a query token `i` with indexer queries `q[i]` [H_I, D_I] and head weights `w[i]` [H_I], the score
of available entry `e < n_avail[i]` is `sum_h w[i, h] * relu(q[i, h] . key[e])`, in fp32, or with
`bf16_intermediates=True` as the reference model computes it in its released precision: the dot products,
the weighted terms `w * relu(.)` and the head sum each rounded to bf16 (fp32 accumulation inside). Entries `e >= n_avail[i]` are not available (causality:
`n_avail = (p + 1) // 4` for a query at position p) and score `-inf`.

Key layout (paged like the attention pool; the page table is shared with the layer's CSA entries):
* bf16: `keys` [num_pages, page_size, D_I]; entry e of sequence s at
  `keys[page_table[s, e // page_size], e % page_size]`.
* FP8: uint8 [num_pages, page_size * (D_I + D_I // 32)]: per page first the e4m3 codes of all its
  entries ([page_size, D_I]), then one ue8m0 exponent per 32 dims of each entry
  ([page_size, D_I // 32]). The block scale is the FP4 one (§2.4), so the model's FP4-simulated
  keys are stored exactly (`pack_index_keys_fp8`).

Top-k returns, per query, the indices of the `min(k, n_avail)` best entries in unspecified order,
padded with -1 to width k. Exact ties are broken arbitrarily (as `torch.topk` does).
"""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .numerics import FP4_BLOCK, FP8_MAX, blocks, exp2i, fp4_block_scale_exponent


def pack_index_keys_fp8(keys: torch.Tensor) -> torch.Tensor:
    """bf16 [pages, page_size, D_I] -> the FP8 key layout uint8 [pages, page_size * (D_I + D_I // 32)]."""
    pages, page_size, d = keys.shape
    exponent = fp4_block_scale_exponent(keys)  # [pages, page_size, D_I // 32]
    codes = (blocks(keys, FP4_BLOCK) / exp2i(exponent)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    codes = codes.to(torch.float8_e4m3fn).view(torch.uint8)
    scales = (exponent + 127).to(torch.uint8)
    return torch.cat([codes.reshape(pages, -1), scales.reshape(pages, -1)], 1)


def unpack_index_keys_fp8(packed: torch.Tensor, page_size: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_index_keys_fp8` -> bf16 [pages, page_size, dim]."""
    pages = packed.shape[0]
    codes = packed[:, : page_size * dim].contiguous().view(torch.float8_e4m3fn).float()
    exponent = packed[:, page_size * dim :].int().reshape(pages, page_size, dim // FP4_BLOCK) - 127
    values = codes.reshape(pages, page_size, -1, FP4_BLOCK) * exp2i(exponent)[..., None]
    return values.flatten(-2).to(torch.bfloat16)


def _check_scores_inputs(q, weights, keys, page_table, q_seq, n_avail, page_size) -> None:
    if q.dim() != 3:
        raise ValueError(f"q: expected [tokens, heads, dim], got {tuple(q.shape)}")
    t, h, d = q.shape
    if weights.shape != (t, h):
        raise ValueError(f"weights: expected [{t}, {h}], got {tuple(weights.shape)}")
    for name, x in (("q_seq", q_seq), ("n_avail", n_avail)):
        if x.shape != (t,):
            raise ValueError(f"{name}: expected [{t}], got {tuple(x.shape)}")
    if keys.dtype == torch.uint8:
        if page_size is None or keys.dim() != 2 or keys.shape[1] != page_size * (d + d // FP4_BLOCK):
            raise ValueError(f"keys: FP8 layout needs page_size and shape [pages, page_size * {d + d // FP4_BLOCK}], "
                             f"got {tuple(keys.shape)}")
    elif keys.dim() != 3 or keys.shape[2] != d:
        raise ValueError(f"keys: expected [pages, page_size, {d}], got {tuple(keys.shape)}")
    if page_table.dim() != 2:
        raise ValueError(f"page_table: expected [sequences, max_pages], got {tuple(page_table.shape)}")


def indexer_scores_ref(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    page_table: torch.Tensor,
    q_seq: torch.Tensor,
    n_avail: torch.Tensor,
    n_max: int,
    page_size: int | None = None,
    *,
    bf16_intermediates: bool = False,
) -> torch.Tensor:
    """fp32 reference of `indexer_scores`: [T, n_max], -inf where not available."""
    t, _, d = q.shape
    if keys.dtype == torch.uint8:
        keys = unpack_index_keys_fp8(keys, page_size, d)
    page_size = keys.shape[1]
    e = torch.arange(n_max, device=q.device)
    pages = page_table.long()[q_seq.long()[:, None], (e // page_size)[None, :].expand(t, -1)]
    k = keys.flatten(0, 1).float()[pages * page_size + e % page_size]  # [T, n_max, D_I]
    dots = torch.einsum("thd,ted->the", q.float(), k)
    if bf16_intermediates:
        terms = dots.bfloat16().relu() * weights.bfloat16()[..., None]  # bf16 product: rounded
        scores = terms.float().sum(1).bfloat16().float()
    else:
        scores = torch.einsum("th,the->te", weights.float(), dots.relu())
    return scores.masked_fill(e[None, :] >= n_avail.long()[:, None], float("-inf"))


def topk_indices_ref(scores: torch.Tensor, n_avail: torch.Tensor, k: int) -> torch.Tensor:
    """Reference top-k: [T, k] int32, best first, -1 past `min(k, n_avail)`."""
    t, n = scores.shape
    e = torch.arange(n, device=scores.device)
    masked = scores.float().masked_fill(e[None, :] >= n_avail.long()[:, None], float("-inf"))
    kk = min(k, n)
    idx = masked.topk(kk, dim=-1).indices.int() if kk else scores.new_zeros(t, 0, dtype=torch.int32)
    idx = torch.cat([idx, idx.new_full((t, k - kk), -1)], 1)
    keep = torch.arange(k, device=scores.device)[None, :] < n_avail.long().clamp(max=k)[:, None]
    return torch.where(keep, idx, torch.full_like(idx, -1))


def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    page_table: torch.Tensor,
    q_seq: torch.Tensor,
    n_avail: torch.Tensor,
    n_max: int,
    page_size: int | None = None,
    *,
    bf16_intermediates: bool = False,
) -> torch.Tensor:
    """Scores [T, n_max] fp32 of every query against entries `[0, n_max)` of its sequence.

    q [T, H_I, D_I] bf16; weights [T, H_I]; keys bf16 [pages, page_size, D_I] or the FP8 layout
    (then pass `page_size`); page_table [S, max_pages] int32; q_seq, n_avail [T] int32.
    """
    _check_scores_inputs(q, weights, keys, page_table, q_seq, n_avail, page_size)
    if use_triton(q, keys):
        from .triton_indexer import indexer_scores_triton

        return indexer_scores_triton(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size,
                                     bf16_intermediates=bf16_intermediates)
    return indexer_scores_ref(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size,
                              bf16_intermediates=bf16_intermediates)


def topk_indices(scores: torch.Tensor, n_avail: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `min(k, n_avail[i])` largest of `scores[i, :n_avail[i]]`, unordered, -1 padded.

    scores [T, N] fp32; n_avail [T] int32 (values above N are treated as N). Returns [T, k] int32.
    """
    if scores.dim() != 2 or n_avail.shape != (scores.shape[0],):
        raise ValueError(f"scores/n_avail: expected [T, N] and [T], got {tuple(scores.shape)}, {tuple(n_avail.shape)}")
    if k < 0:
        raise ValueError(f"k: must be >= 0, got {k}")
    if use_triton(scores):
        from .triton_indexer import topk_indices_triton

        return topk_indices_triton(scores, n_avail, k)
    return topk_indices_ref(scores, n_avail, k)


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    page_table: torch.Tensor,
    q_seq: torch.Tensor,
    n_avail: torch.Tensor,
    n_max: int,
    k: int,
    page_size: int | None = None,
) -> torch.Tensor:
    """Selected entries [T, k] int32 (unordered, -1 padded): scoring then top-k."""
    return topk_indices(indexer_scores(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size), n_avail, k)

"""Triton kernels for `indexer.indexer_scores` and `indexer.topk_indices` (semantics there).

Scoring: one program = one query x BLOCK_N entries; the query's [H_I, D_I] tile stays in registers
and `keys @ q^T` gives all heads at once, then ReLU, head weights and the head sum.

Top-k is a radix select on the order-preserving uint32 image of the fp32 scores, in three launches:
1. histogram of the top 11 bits over all available scores (many programs, atomics per bin);
2. each program finds the threshold bin from the histogram, writes the indices of scores in higher
   bins straight to the output and appends those in the threshold bin to a candidate list;
3. one program per query refines the candidates over the remaining 21 bits (3 rounds of 7 bits; in
   registers when they fit one tile), emits the winners, takes exact ties in list order, pads with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import FP4_BLOCK
from .triton_utils import INTERPRET, dot

# Radix of the first (parallel) pass and of each of the 3 refinement rounds: 11 + 3 * 7 = 32 bits.
# Measured on H100 (top-512 of 256K): 11 bits leave few candidates for the single-program refinement;
# 8 bits make the histograms cheaper (Triton's costs ~bins/32 operations per element) but leave
# thousands of candidates, and the refinement then dominates.
TOP_BITS = 11
SUB_BITS = 7


@triton.jit
def _index_scores_kernel(
    q_ptr, stride_qt, stride_qh, w_ptr, stride_wt,
    keys_ptr, stride_page, page_size, pt_ptr, stride_pt, q_seq_ptr, n_avail_ptr,
    out_ptr, stride_ot, n_max,
    HI: tl.constexpr, DI: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, SB: tl.constexpr,
    INTERP: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(tl.load(n_avail_ptr + t), n_max)
    out_ptrs = out_ptr + t.to(tl.int64) * stride_ot + e
    if tl.program_id(1) * BLOCK_N < n:
        valid = e < n
        offs_h = tl.arange(0, HI)
        offs_d = tl.arange(0, DI)
        q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :])
        w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + offs_h).to(tl.float32)
        seq = tl.load(q_seq_ptr + t).to(tl.int64)
        page = tl.load(pt_ptr + seq * stride_pt + e // page_size, mask=valid, other=0).to(tl.int64)
        slot = e % page_size
        if FP8:
            # page bytes: [page_size, DI] e4m3 codes, then [page_size, DI // SB] ue8m0 exponents
            NB: tl.constexpr = DI // SB
            page_ptr = keys_ptr + page * stride_page
            blk = tl.arange(0, NB)[None, :, None]
            el = tl.arange(0, SB)[None, None, :]
            codes = tl.load(page_ptr[:, None, None] + slot[:, None, None] * DI + blk * SB + el,
                            mask=valid[:, None, None], other=0)
            sc = tl.load(page_ptr[:, None] + page_size * DI + slot[:, None] * NB + tl.arange(0, NB)[None, :],
                         mask=valid[:, None], other=127)
            scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            k3 = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]
            k = tl.reshape(k3, (BLOCK_N, DI)).to(tl.bfloat16)
        else:
            rows = page * page_size + slot
            k = tl.load(keys_ptr + rows[:, None] * stride_page + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = dot(k, tl.trans(q), INTERP)  # [BLOCK_N, HI]
        score = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
        tl.store(out_ptrs, tl.where(valid, score, float("-inf")), mask=e < n_max)
    else:  # nothing available in this block
        tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=e < n_max)


def indexer_scores_triton(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size=None, *, block_n=64,
                          num_warps=4):
    t, hi, di = q.shape
    out = torch.empty(t, n_max, device=q.device, dtype=torch.float32)
    if t == 0 or n_max == 0:
        return out
    fp8 = keys.dtype == torch.uint8
    if not fp8:
        page_size = keys.shape[1]
        keys = keys.flatten(0, 1)
    _index_scores_kernel[(t, triton.cdiv(n_max, block_n))](
        q, q.stride(0), q.stride(1), weights, weights.stride(0),
        keys, keys.stride(0), page_size, page_table, page_table.stride(0), q_seq, n_avail,
        out, out.stride(0), n_max,
        HI=hi, DI=di, BLOCK_N=block_n, FP8=fp8, SB=FP4_BLOCK, INTERP=INTERPRET, num_warps=num_warps,
    )
    return out


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 with the same order (larger score <=> larger key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _topk_hist_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, hist_ptr, stride_hist,
                      CHUNK: tl.constexpr, TOP_BITS: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    if tl.program_id(1) * CHUNK < n:
        valid = offs < n
        x = tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=valid, other=0.0)
        digit = (_ordered_key(x) >> (32 - TOP_BITS)).to(tl.int32)
        h = tl.histogram(digit, 1 << TOP_BITS, mask=valid)
        bins = tl.arange(0, 1 << TOP_BITS)
        tl.atomic_add(hist_ptr + row.to(tl.int64) * stride_hist + bins, h, mask=h > 0)


@triton.jit
def _threshold(hist, need, NBINS: tl.constexpr):
    """Largest bin b with (count of bins >= b) >= need, and the count strictly above it."""
    bins = tl.arange(0, NBINS)
    count_ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    thr = tl.max(tl.where(count_ge >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > thr, hist, 0), 0)
    return thr, above


@triton.jit
def _topk_split_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, k, hist_ptr, stride_hist,
                       out_ptr, stride_o, cand_ptr, stride_c,
                       CHUNK: tl.constexpr, TOP_BITS: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    if tl.program_id(1) * CHUNK < n:
        hist = tl.load(hist_ptr + row64 * stride_hist + tl.arange(0, 1 << TOP_BITS))
        thr, _ = _threshold(hist, tl.minimum(k, n), 1 << TOP_BITS)
        thr = tl.where(n <= k, -1, thr)  # everything available is selected
        valid = offs < n
        x = tl.load(scores_ptr + row64 * stride_s + offs, mask=valid, other=0.0)
        digit = (_ordered_key(x) >> (32 - TOP_BITS)).to(tl.int32)
        sel = valid & (digit > thr)
        cand = valid & (digit == thr)
        counters = hist_ptr + row64 * stride_hist + (1 << TOP_BITS)  # [selected, candidates]
        base = tl.atomic_add(counters, tl.sum(sel.to(tl.int32), 0))
        tl.store(out_ptr + row64 * stride_o + base + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
        cbase = tl.atomic_add(counters + 1, tl.sum(cand.to(tl.int32), 0))
        tl.store(cand_ptr + row64 * stride_c + cbase + tl.cumsum(cand.to(tl.int32), 0) - 1, offs, mask=cand)


@triton.jit
def _load_cand_keys(scores_ptr, stride_s, cand_ptr, stride_c, row64, c0, n_cand, BLOCK: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK)
    m = offs < n_cand
    ci = tl.load(cand_ptr + row64 * stride_c + offs, mask=m, other=0)
    key = _ordered_key(tl.load(scores_ptr + row64 * stride_s + ci, mask=m, other=0.0))
    return ci, key, m


@triton.jit
def _topk_finish_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, k, hist_ptr, stride_hist,
                        out_ptr, stride_o, cand_ptr, stride_c,
                        BLOCK: tl.constexpr, TOP_BITS: tl.constexpr, SUB_BITS: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    kk = tl.minimum(k, n)
    hist = tl.load(hist_ptr + row64 * stride_hist + tl.arange(0, 1 << TOP_BITS))
    thr, above = _threshold(hist, kk, 1 << TOP_BITS)
    n_cand = tl.where(n <= k, 0, tl.load(hist_ptr + row64 * stride_hist + (1 << TOP_BITS) + 1))
    above = tl.where(n <= k, kk, above)
    need = kk - above  # winners still to take from the candidates
    prefix = thr.to(tl.uint32)  # known top bits of the k-th largest key
    pos = above
    out_row = out_ptr + row64 * stride_o
    SUB_MASK: tl.constexpr = (1 << SUB_BITS) - 1
    if n_cand <= BLOCK:
        # common case: all candidates fit one tile; refine the threshold key in registers
        ci, key, m = _load_cand_keys(scores_ptr, stride_s, cand_ptr, stride_c, row64, 0, n_cand, BLOCK)
        for r in tl.static_range(3):
            shift = 32 - TOP_BITS - (r + 1) * SUB_BITS  # constexpr: r is a static_range index
            match = m & ((key >> (shift + SUB_BITS)) == prefix)
            h = tl.histogram(((key >> shift) & SUB_MASK).to(tl.int32), 1 << SUB_BITS, mask=match)
            sub_thr, sub_above = _threshold(h, need, 1 << SUB_BITS)
            need -= sub_above
            prefix = (prefix << SUB_BITS) | tl.maximum(sub_thr, 0).to(tl.uint32)
        sel = m & (key > prefix)  # strictly above the k-th key
        tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
        pos += tl.sum(sel.to(tl.int32), 0)
        tie = m & (key == prefix)
        rank = tl.cumsum(tie.to(tl.int32), 0)
        tl.store(out_row + pos + rank - 1, ci, mask=tie & (rank <= need))
    else:
        # many candidates (heavy ties): the same refinement, streaming the list from memory
        for r in tl.static_range(3):
            shift = 32 - TOP_BITS - (r + 1) * SUB_BITS
            h = tl.zeros([1 << SUB_BITS], tl.int32)
            for c0 in range(0, n_cand, BLOCK):
                ci, key, m = _load_cand_keys(scores_ptr, stride_s, cand_ptr, stride_c, row64, c0, n_cand, BLOCK)
                match = m & ((key >> (shift + SUB_BITS)) == prefix)
                h += tl.histogram(((key >> shift) & SUB_MASK).to(tl.int32), 1 << SUB_BITS, mask=match)
            sub_thr, sub_above = _threshold(h, need, 1 << SUB_BITS)
            need -= sub_above
            prefix = (prefix << SUB_BITS) | tl.maximum(sub_thr, 0).to(tl.uint32)
        for c0 in range(0, n_cand, BLOCK):
            ci, key, m = _load_cand_keys(scores_ptr, stride_s, cand_ptr, stride_c, row64, c0, n_cand, BLOCK)
            sel = m & (key > prefix)
            tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
            pos += tl.sum(sel.to(tl.int32), 0)
        for c0 in range(0, n_cand, BLOCK):  # exact ties with the k-th key: the first `need` in list order
            ci, key, m = _load_cand_keys(scores_ptr, stride_s, cand_ptr, stride_c, row64, c0, n_cand, BLOCK)
            tie = m & (key == prefix)
            rank = tl.cumsum(tie.to(tl.int32), 0)
            sel = tie & (rank <= need)
            tl.store(out_row + pos + rank - 1, ci, mask=sel)
            taken = tl.sum(sel.to(tl.int32), 0)
            pos += taken
            need -= taken
    offs = tl.arange(0, BLOCK)
    for c0 in range(kk, k, BLOCK):
        tl.store(out_row + c0 + offs, tl.full([BLOCK], -1, tl.int32), mask=c0 + offs < k)


def topk_indices_triton(scores: torch.Tensor, n_avail: torch.Tensor, k: int, *, chunk: int | None = None,
                        block: int = 2048) -> torch.Tensor:
    t, n = scores.shape
    out = torch.empty(t, k, device=scores.device, dtype=torch.int32)
    if t == 0 or k == 0:
        return out
    if chunk is None:  # measured on H100: smaller chunks (more programs) win for a few rows
        chunk = 2048 if t < 8 else 4096
    nbins = 1 << TOP_BITS
    work = torch.zeros(t, nbins + 2, device=scores.device, dtype=torch.int32)  # histogram + 2 counters
    cand = torch.empty(t, max(n, 1), device=scores.device, dtype=torch.int32)
    grid = (t, max(1, triton.cdiv(n, chunk)))
    common = (scores, scores.stride(0), n_avail, n)
    _topk_hist_kernel[grid](*common, work, work.stride(0), CHUNK=chunk, TOP_BITS=TOP_BITS, num_warps=8)
    _topk_split_kernel[grid](*common, k, work, work.stride(0), out, out.stride(0), cand, cand.stride(0),
                             CHUNK=chunk, TOP_BITS=TOP_BITS, num_warps=8)
    _topk_finish_kernel[(t,)](*common, k, work, work.stride(0), out, out.stride(0), cand, cand.stride(0),
                              BLOCK=block, TOP_BITS=TOP_BITS, SUB_BITS=SUB_BITS, num_warps=4)
    return out

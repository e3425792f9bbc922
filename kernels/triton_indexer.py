"""Triton kernels for `indexer.indexer_scores` and `indexer.topk_indices` (semantics there).

Scoring: one program = one query x BLOCK_N entries; the query's [H_I, D_I] tile stays in registers
and `keys @ q^T` gives all heads at once, then ReLU, head weights and the head sum.

Top-k is a radix select on the order-preserving uint32 image of the fp32 scores, 8-bit digits, three
launches:
1. histogram of digit 1 (top 8 bits) over all available scores (many programs, atomics per bin);
2. each program finds the digit-1 threshold, writes the indices of higher scores straight to the
   output, appends the scores on the threshold (index + key) to a candidate list and adds their
   digit 2 to a second histogram;
3. one program per query emits the candidates above the digit-2 threshold, compacts those on it,
   resolves digits 3-4 on that short list (in registers when it fits one tile), takes exact ties in
   list order and pads with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .numerics import FP4_BLOCK
from .triton_utils import INTERPRET, dot, round_bf16

# Radix select in 8-bit digits, most significant first (Triton's histogram costs ~bins/32 operations per
# element and thread, so digits stay small): digit 1 over all scores, digit 2 over the candidates that
# tie on digit 1 (computed in the same pass), digits 3-4 over the few that tie on both.
DIGIT = 8
NBINS = 1 << DIGIT


@triton.jit
def _index_scores_kernel(
    q_ptr, stride_qt, stride_qh, w_ptr, stride_wt,
    keys_ptr, stride_page, page_size, pt_ptr, stride_pt, q_seq_ptr, n_avail_ptr,
    out_ptr, stride_ot, n_max,
    HI: tl.constexpr, DI: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, SB: tl.constexpr,
    INTERP: tl.constexpr, BF16_STEPS: tl.constexpr,
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
        if BF16_STEPS:  # the reference model's bf16 tensors: dots, weighted terms and the head sum rounded
            terms = round_bf16(tl.maximum(round_bf16(s), 0.0) * round_bf16(w)[None, :])
            score = round_bf16(tl.sum(terms, 1))
        else:
            score = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
        tl.store(out_ptrs, tl.where(valid, score, float("-inf")), mask=e < n_max)
    else:  # nothing available in this block
        tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=e < n_max)


def indexer_scores_triton(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size=None, *, block_n=64,
                          num_warps=4, bf16_intermediates=False):
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
        HI=hi, DI=di, BLOCK_N=block_n, FP8=fp8, SB=FP4_BLOCK, INTERP=INTERPRET, BF16_STEPS=bf16_intermediates,
        num_warps=num_warps,
    )
    return out


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 with the same order (larger score <=> larger key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _topk_hist_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, work_ptr, stride_w,
                      CHUNK: tl.constexpr, NBINS: tl.constexpr):
    """work[row, 0:NBINS] += histogram of digit 1 (the top 8 bits of the ordered key)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    if tl.program_id(1) * CHUNK < n:
        valid = offs < n
        x = tl.load(scores_ptr + row.to(tl.int64) * stride_s + offs, mask=valid, other=0.0)
        h = tl.histogram((_ordered_key(x) >> 24).to(tl.int32), NBINS, mask=valid)
        tl.atomic_add(work_ptr + row.to(tl.int64) * stride_w + tl.arange(0, NBINS), h, mask=h > 0)


@triton.jit
def _threshold(hist, need, NBINS: tl.constexpr):
    """Largest bin b with (count of bins >= b) >= need, and the count strictly above it."""
    bins = tl.arange(0, NBINS)
    count_ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    thr = tl.max(tl.where(count_ge >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > thr, hist, 0), 0)
    return thr, above


@triton.jit
def _topk_split_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, k, work_ptr, stride_w,
                       out_ptr, stride_o, cand_idx_ptr, cand_key_ptr, stride_c,
                       CHUNK: tl.constexpr, NBINS: tl.constexpr):
    """Scores above the digit-1 threshold go to the output; those on it to the candidate list (index
    and key), and their digit 2 into the second histogram work[row, NBINS:2*NBINS]."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    if tl.program_id(1) * CHUNK < n:
        w_row = work_ptr + row64 * stride_w
        thr, _ = _threshold(tl.load(w_row + tl.arange(0, NBINS)), tl.minimum(k, n), NBINS)
        thr = tl.where(n <= k, -1, thr)  # everything available is selected
        valid = offs < n
        key = _ordered_key(tl.load(scores_ptr + row64 * stride_s + offs, mask=valid, other=0.0))
        digit = (key >> 24).to(tl.int32)
        sel = valid & (digit > thr)
        cand = valid & (digit == thr)
        base = tl.atomic_add(w_row + 2 * NBINS, tl.sum(sel.to(tl.int32), 0))  # counters: selected, candidates
        tl.store(out_ptr + row64 * stride_o + base + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
        cpos = row64 * stride_c + tl.atomic_add(w_row + 2 * NBINS + 1, tl.sum(cand.to(tl.int32), 0)) \
            + tl.cumsum(cand.to(tl.int32), 0) - 1
        tl.store(cand_idx_ptr + cpos, offs, mask=cand)
        tl.store(cand_key_ptr + cpos, key.to(tl.int32, bitcast=True), mask=cand)
        h2 = tl.histogram(((key >> 16) & (NBINS - 1)).to(tl.int32), NBINS, mask=cand)
        tl.atomic_add(w_row + NBINS + tl.arange(0, NBINS), h2, mask=h2 > 0)


@triton.jit
def _load_cands(cand_idx_ptr, cand_key_ptr, base, c0, n_cand, BLOCK: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK)
    m = offs < n_cand
    ci = tl.load(cand_idx_ptr + base + offs, mask=m, other=0)
    key = tl.load(cand_key_ptr + base + offs, mask=m, other=0).to(tl.uint32, bitcast=True)
    return ci, key, m


@triton.jit
def _topk_finish_kernel(n_avail_ptr, n_cols, k, work_ptr, stride_w, out_ptr, stride_o,
                        cand_idx_ptr, cand_key_ptr, stride_c, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """Per query: digit-2 threshold from its histogram; one pass over the candidates emits those above
    it and compacts those on it to the front of the list; digits 3 and 4 are then resolved on that
    short list (in registers when it fits one tile); exact ties are taken in list order; -1 padding."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    n = tl.minimum(tl.load(n_avail_ptr + row), n_cols)
    kk = tl.minimum(k, n)
    w_row = work_ptr + row64 * stride_w
    thr1, above = _threshold(tl.load(w_row + tl.arange(0, NBINS)), kk, NBINS)
    n_cand = tl.where(n <= k, 0, tl.load(w_row + 2 * NBINS + 1))
    pos = tl.where(n <= k, kk, above)  # output slots already filled by the split kernel
    need = kk - pos
    thr2, above2 = _threshold(tl.load(w_row + NBINS + tl.arange(0, NBINS)), need, NBINS)
    need -= above2
    prefix = (thr1.to(tl.uint32) << 8) | tl.maximum(thr2, 0).to(tl.uint32)  # top 16 bits of the k-th key
    out_row = out_ptr + row64 * stride_o
    cbase = row64 * stride_c
    n2 = n_cand * 0
    for c0 in range(0, n_cand, BLOCK):
        ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, c0, n_cand, BLOCK)
        sel = m & ((key >> 16) > prefix)
        tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
        pos += tl.sum(sel.to(tl.int32), 0)
        eq = m & ((key >> 16) == prefix)
        dst = cbase + n2 + tl.cumsum(eq.to(tl.int32), 0) - 1  # never past the tile just read
        tl.store(cand_idx_ptr + dst, ci, mask=eq)
        tl.store(cand_key_ptr + dst, key.to(tl.int32, bitcast=True), mask=eq)
        n2 += tl.sum(eq.to(tl.int32), 0)
    tl.debug_barrier()  # the compacted list is read back by other threads of this program
    if n2 <= BLOCK:
        ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, 0, n2, BLOCK)
        for r in tl.static_range(2):
            shift = 8 - 8 * r  # constexpr: r is a static_range index
            match = m & ((key >> (shift + 8)) == prefix)
            h = tl.histogram(((key >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=match)
            sub_thr, sub_above = _threshold(h, need, NBINS)
            need -= sub_above
            prefix = (prefix << 8) | tl.maximum(sub_thr, 0).to(tl.uint32)
        sel = m & (key > prefix)  # strictly above the k-th key
        tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
        pos += tl.sum(sel.to(tl.int32), 0)
        tie = m & (key == prefix)
        rank = tl.cumsum(tie.to(tl.int32), 0)
        tl.store(out_row + pos + rank - 1, ci, mask=tie & (rank <= need))
    else:  # many exact or near ties: the same refinement, streaming the list
        for r in tl.static_range(2):
            shift = 8 - 8 * r
            h = tl.zeros([NBINS], tl.int32)
            for c0 in range(0, n2, BLOCK):
                ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, c0, n2, BLOCK)
                match = m & ((key >> (shift + 8)) == prefix)
                h += tl.histogram(((key >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=match)
            sub_thr, sub_above = _threshold(h, need, NBINS)
            need -= sub_above
            prefix = (prefix << 8) | tl.maximum(sub_thr, 0).to(tl.uint32)
        for c0 in range(0, n2, BLOCK):
            ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, c0, n2, BLOCK)
            sel = m & (key > prefix)
            tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
            pos += tl.sum(sel.to(tl.int32), 0)
        for c0 in range(0, n2, BLOCK):  # exact ties with the k-th key: the first `need` in list order
            ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, c0, n2, BLOCK)
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
                        block: int = 1024) -> torch.Tensor:
    t, n = scores.shape
    out = torch.empty(t, k, device=scores.device, dtype=torch.int32)
    if t == 0 or k == 0:
        return out
    if chunk is None:  # a few thousand scores per program; more programs for a few rows
        chunk = 2048 if t < 8 else 4096
    work = torch.zeros(t, 2 * NBINS + 2, device=scores.device, dtype=torch.int32)  # 2 histograms, 2 counters
    cand_idx = torch.empty(t, max(n, 1), device=scores.device, dtype=torch.int32)
    cand_key = torch.empty_like(cand_idx)
    grid = (t, max(1, triton.cdiv(n, chunk)))
    common = (scores, scores.stride(0), n_avail, n)
    _topk_hist_kernel[grid](*common, work, work.stride(0), CHUNK=chunk, NBINS=NBINS, num_warps=8)
    _topk_split_kernel[grid](*common, k, work, work.stride(0), out, out.stride(0), cand_idx, cand_key,
                             cand_idx.stride(0), CHUNK=chunk, NBINS=NBINS, num_warps=8)
    _topk_finish_kernel[(t,)](n_avail, n, k, work, work.stride(0), out, out.stride(0), cand_idx, cand_key,
                              cand_idx.stride(0), BLOCK=block, NBINS=NBINS, num_warps=8 if block >= 4096 else 4)
    return out

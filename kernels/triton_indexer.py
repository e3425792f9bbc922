"""Triton kernels for `indexer.indexer_scores` and `indexer.topk_indices` (semantics there).

Scoring: one program = one query x a strided set of BLOCK_N-entry tiles; the query's [H_I, D_I] tile is
loaded once and `keys @ q^T` gives all heads at once, then ReLU, head weights and the head sum. FP8 keys
are dequantised to bf16 in registers (e4m3 -> fp32, times the block scale).

Top-k is a radix select on the order-preserving uint32 image of the fp32 scores, 8-bit digits, three
launches over the same grid (a few thousand scores per program):
1. histogram of digit 1 (top 8 bits) of all available scores (atomics per bin);
2. histogram of digit 2 of the scores whose digit 1 is the threshold (the k-th key's);
3. scores above the k-th key's top 16 bits go straight to the output (one atomic slot/candidate counter),
   those equal to them to a short candidate list; the program that finishes last (per row) picks the rest
   of that list by pairwise rank when it is short (exact ties: smaller index first), else by digits 3-4
   (in registers when the list fits one tile, streamed otherwise; exact ties in list order), pads
   with -1 and zeroes the row's workspace for the next call (a persistent one: no memset launch).
On Hopper+ launches 2 and 3 are programmatic dependent launches: each kernel lets the next one launch
when all its programs started; the next loads its scores, then waits for the previous grid's end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .numerics import FP4_BLOCK
from .triton_utils import INTERPRET, arrive, dot, pdl_supported, round_bf16, zeroed_workspace

# Radix select in 8-bit digits, most significant first (Triton's histogram costs ~bins/32 operations per
# element and thread, so digits stay small): digit 1 over all scores, digit 2 over those that tie on
# digit 1, digits 3-4 over the few that tie on both.
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
    n = tl.minimum(tl.load(n_avail_ptr + t), n_max)
    offs_h = tl.arange(0, HI)
    offs_d = tl.arange(0, DI)
    q_row = q_ptr + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh
    w = tl.load(w_ptr + t.to(tl.int64) * stride_wt + offs_h).to(tl.float32)
    if BF16_STEPS:
        w = round_bf16(w)
    seq = tl.load(q_seq_ptr + t).to(tl.int64)
    # the query's tile is loaded once and reused for every BLOCK_N tile of entries this program scores
    q_all = tl.load(q_row + offs_d[None, :])
    for tile in range(tl.program_id(1), tl.cdiv(n_max, BLOCK_N), tl.num_programs(1)):
        e = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = out_ptr + t.to(tl.int64) * stride_ot + e
        if tile * BLOCK_N < n:
            valid = e < n
            page = tl.load(pt_ptr + seq * stride_pt + e // page_size, mask=valid, other=0).to(tl.int64)
            slot = e % page_size
            if FP8:
                # page bytes: [page_size, DI] e4m3 codes, then [page_size, DI // SB] ue8m0 exponents. (Measured
                # slower on H100: e4m3 -> bf16 with the scale as an exponent add or a bf16 multiply, a 2-D code
                # tile with per-element scale gathers, per-block dots with the scale applied afterwards.)
                NB: tl.constexpr = DI // SB
                page_ptr = keys_ptr + page * stride_page
                blk = tl.arange(0, NB)[None, :, None]
                el = tl.arange(0, SB)[None, None, :]
                codes = tl.load(page_ptr[:, None, None] + slot[:, None, None] * DI + blk * SB + el,
                                mask=valid[:, None, None], other=0)  # [BLOCK_N, NB, SB]
                sc = tl.load(page_ptr[:, None] + page_size * DI + slot[:, None] * NB + tl.arange(0, NB)[None, :],
                             mask=valid[:, None], other=127)
                scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)
                k3 = (codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]).to(tl.bfloat16)
                k = tl.reshape(k3, (BLOCK_N, DI))
            else:
                rows = page * page_size + slot
                k = tl.load(keys_ptr + rows[:, None] * stride_page + offs_d[None, :], mask=valid[:, None],
                            other=0.0)
            s = dot(k, tl.trans(q_all), INTERP)  # [BLOCK_N, HI]
            if BF16_STEPS:  # the reference model's bf16 tensors: dots, weighted terms and the head sum rounded
                terms = round_bf16(tl.maximum(round_bf16(s), 0.0) * w[None, :])
                score = round_bf16(tl.sum(terms, 1))
            else:
                score = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
            tl.store(out_ptrs, tl.where(valid, score, float("-inf")), mask=e < n_max)
        else:  # nothing available in this block
            tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=e < n_max)


def indexer_scores_triton(q, weights, keys, page_table, q_seq, n_avail, n_max, page_size=None, *, block_n=None,
                          num_warps=None, bf16_intermediates=False, tiles_per_program=None):
    t, hi, di = q.shape
    out = torch.empty(t, n_max, device=q.device, dtype=torch.float32)
    if t == 0 or n_max == 0:
        return out
    fp8 = keys.dtype == torch.uint8
    if not fp8:
        page_size = keys.shape[1]
        keys = keys.flatten(0, 1)
    # tuned on H100: small problems (latency-bound) one 64-entry tile per 8-warp program; large ones 4 tiles
    # per 4-warp program (the query tile loaded once), FP8 keys in 128-entry tiles once t * n >= 2^20
    large = t * triton.cdiv(n_max, 64) >= 2048
    block_n = block_n or (128 if fp8 and t * n_max >= 1 << 20 else 64)
    num_warps = num_warps or (4 if large else 8)
    tiles_per_program = tiles_per_program or (4 if large else 1)
    n_tiles = triton.cdiv(n_max, block_n)
    _index_scores_kernel[(t, triton.cdiv(n_tiles, tiles_per_program))](
        q, q.stride(0), q.stride(1), weights, weights.stride(0),
        keys, keys.stride(0), page_size, page_table, page_table.stride(0), q_seq, n_avail,
        out, out.stride(0), n_max,
        HI=hi, DI=di, BLOCK_N=block_n, FP8=fp8, SB=FP4_BLOCK, INTERP=INTERPRET, BF16_STEPS=bf16_intermediates,
        num_warps=num_warps, num_stages=2,  # as measured (4 stages: no gain)
    )
    return out


@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 with the same order (larger score <=> larger key)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _topk_hist_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, work_ptr, stride_w,
                      CHUNK: tl.constexpr, NBINS: tl.constexpr, PDL: tl.constexpr):
    """work[row, 0:NBINS] += histogram of digit 1 (the top 8 bits of the ordered key)."""
    if PDL:
        gdc_launch_dependents()
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
def _topk_digit2_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, k, work_ptr, stride_w,
                        CHUNK: tl.constexpr, NBINS: tl.constexpr, PDL: tl.constexpr):
    """work[row, NBINS:2*NBINS] += histogram of digit 2 of the scores whose digit 1 is the threshold."""
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.maximum(tl.minimum(tl.load(n_avail_ptr + row), n_cols), 0)
    active = (tl.program_id(1) * CHUNK < n) & (n > k)  # n <= k: everything available is selected
    valid = (offs < n) & active
    key = _ordered_key(tl.load(scores_ptr + row64 * stride_s + offs, mask=valid, other=0.0))
    if PDL:  # every program (the next kernel's wait covers the hist kernel through ours): histogram 1 done
        gdc_wait()
    if active:
        w_row = work_ptr + row64 * stride_w
        thr1, _ = _threshold(tl.load(w_row + tl.arange(0, NBINS)), k, NBINS)
        cand = valid & ((key >> 24).to(tl.int32) == thr1)
        if tl.sum(cand.to(tl.int32), 0) > 0:
            h2 = tl.histogram(((key >> 16) & (NBINS - 1)).to(tl.int32), NBINS, mask=cand)
            tl.atomic_add(w_row + NBINS + tl.arange(0, NBINS), h2, mask=h2 > 0)


@triton.jit
def _key_prefix16(w_row, kk, NBINS: tl.constexpr):
    """From the digit-1 and digit-2 histograms: the top 16 bits of the kk-th largest key, how many keys
    have larger top 16 bits (all selected) and how many share them (the candidates)."""
    thr1, above1 = _threshold(tl.load(w_row + tl.arange(0, NBINS)), kk, NBINS)
    hist2 = tl.load(w_row + NBINS + tl.arange(0, NBINS))
    thr2, above2 = _threshold(hist2, kk - above1, NBINS)
    n_cand = tl.sum(tl.where(tl.arange(0, NBINS) == thr2, hist2, 0), 0)
    return (thr1.to(tl.uint32) << 8) | thr2.to(tl.uint32), above1 + above2, n_cand


@triton.jit
def _topk_emit_kernel(scores_ptr, stride_s, n_avail_ptr, n_cols, k, work_ptr, stride_w,
                      out_ptr, stride_o, cand_idx_ptr, cand_key_ptr, stride_c,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, RANK_BLOCK: tl.constexpr, NBINS: tl.constexpr,
                      PDL: tl.constexpr):
    """Every program: the scores whose top 16 key bits exceed those of the k-th key go to the output,
    those equal to them to the candidate list. The program that finishes last (per row) then selects
    the rest from that short list, pads with -1 and zeroes the row's workspace."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    n = tl.maximum(tl.minimum(tl.load(n_avail_ptr + row), n_cols), 0)
    kk = tl.minimum(k, n)
    w_row = work_ptr + row64 * stride_w
    # one 64-bit counter (output slots taken << 32 | candidates listed), then the finished-program count
    slots_cands = (w_row + 2 * NBINS).to(tl.pointer_type(tl.int64))
    out_row = out_ptr + row64 * stride_o
    cbase = row64 * stride_c
    valid = offs < n
    key = _ordered_key(tl.load(scores_ptr + row64 * stride_s + offs, mask=valid & (n > k), other=0.0))
    if PDL:  # both histograms done
        gdc_wait()
    if n <= k:  # all available entries, in place
        tl.store(out_row + offs, offs, mask=valid)
    elif tl.program_id(1) * CHUNK < n:
        prefix, _, _ = _key_prefix16(w_row, kk, NBINS)
        sel = valid & ((key >> 16) > prefix)
        cand = valid & ((key >> 16) == prefix)
        n_sel = tl.sum(sel.to(tl.int32), 0)
        n_cand = tl.sum(cand.to(tl.int32), 0)
        if n_sel + n_cand > 0:
            base = tl.atomic_add(slots_cands, (n_sel.to(tl.int64) << 32) | n_cand.to(tl.int64))
            tl.store(out_row + (base >> 32) + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
            cpos = cbase + (base & 0xFFFFFFFF) + tl.cumsum(cand.to(tl.int32), 0) - 1
            tl.store(cand_idx_ptr + cpos, offs, mask=cand)
            tl.store(cand_key_ptr + cpos, key.to(tl.int32, bitcast=True), mask=cand)
    # the last program to arrive sees everybody's stores
    if arrive(w_row + 2 * NBINS + 2) == tl.num_programs(1) - 1:
        if n > k:
            prefix, pos, n2 = _key_prefix16(w_row, kk, NBINS)
            if n2 <= RANK_BLOCK:
                _topk_rank_candidates(out_row, cand_idx_ptr, cand_key_ptr, cbase, n2, pos, kk - pos, RANK_BLOCK)
            else:
                _topk_select_candidates(out_row, cand_idx_ptr, cand_key_ptr, cbase, n2, prefix, pos, kk - pos,
                                        BLOCK, NBINS)
        lane = tl.arange(0, BLOCK)
        for c0 in range(kk, k, BLOCK):
            tl.store(out_row + c0 + lane, tl.full([BLOCK], -1, tl.int32), mask=c0 + lane < k)
        # every other program is done with the row's workspace, and so are our threads after the barrier
        tl.debug_barrier()
        tl.store(w_row + tl.arange(0, 2 * NBINS), tl.zeros([2 * NBINS], tl.int32))
        tl.store(w_row + 2 * NBINS + tl.arange(0, 4), tl.zeros([4], tl.int32))


@triton.jit
def _topk_rank_candidates(out_row, cand_idx_ptr, cand_key_ptr, cbase, n2, pos, need, RB: tl.constexpr):
    """The `need` best of n2 <= RB candidates by their rank among all of them (larger key first, exact
    ties by smaller index, so the choice is deterministic), written to output slots pos + rank."""
    ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, 0, n2, RB)
    ki, kj = key[:, None], key[None, :]
    beats = m[None, :] & ((kj > ki) | ((kj == ki) & (ci[None, :] < ci[:, None])))  # [i, j]: j ranks before i
    rank = tl.sum(beats.to(tl.int32), 1)
    tl.store(out_row + pos + rank, ci, mask=m & (rank < need))


@triton.jit
def _load_cands(cand_idx_ptr, cand_key_ptr, base, c0, n_cand, BLOCK: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK)
    m = offs < n_cand
    # .cg: written by other programs of this launch; read from L2, never a stale L1 line
    ci = tl.load(cand_idx_ptr + base + offs, mask=m, other=0, cache_modifier=".cg")
    key = tl.load(cand_key_ptr + base + offs, mask=m, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    return ci, key, m


@triton.jit
def _topk_select_candidates(out_row, cand_idx_ptr, cand_key_ptr, cbase, n2, prefix, pos, need,
                            BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """The `need` largest of the n2 candidates (all sharing the top 16 key bits `prefix`) go to output
    slots pos..: digits 3 and 4 by histogram (in registers when the list fits one tile, else streamed),
    then exact ties with the k-th key in list order."""
    if n2 <= BLOCK:
        ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, 0, n2, BLOCK)
        for r in tl.static_range(2):
            shift = 8 - 8 * r  # constexpr: r is a static_range index
            match = m & ((key >> (shift + 8)) == prefix)
            h = tl.histogram(((key >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=match)
            sub_thr, sub_above = _threshold(h, need, NBINS)
            need -= sub_above
            prefix = (prefix << 8) | sub_thr.to(tl.uint32)
        sel = m & (key > prefix)  # strictly above the k-th key
        tl.store(out_row + pos + tl.cumsum(sel.to(tl.int32), 0) - 1, ci, mask=sel)
        pos += tl.sum(sel.to(tl.int32), 0)
        tie = m & (key == prefix)
        rank = tl.cumsum(tie.to(tl.int32), 0)
        tl.store(out_row + pos + rank - 1, ci, mask=tie & (rank <= need))
    else:  # many exact or near ties: the same, streaming the list
        for r in tl.static_range(2):
            shift = 8 - 8 * r
            h = tl.zeros([NBINS], tl.int32)
            for c0 in range(0, n2, BLOCK):
                ci, key, m = _load_cands(cand_idx_ptr, cand_key_ptr, cbase, c0, n2, BLOCK)
                match = m & ((key >> (shift + 8)) == prefix)
                h += tl.histogram(((key >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=match)
            sub_thr, sub_above = _threshold(h, need, NBINS)
            need -= sub_above
            prefix = (prefix << 8) | sub_thr.to(tl.uint32)
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


def topk_indices_triton(scores: torch.Tensor, n_avail: torch.Tensor, k: int, *, chunk: int | None = None,
                        block: int | None = None, rank_block: int = 128, num_warps: int = 8) -> torch.Tensor:
    t, n = scores.shape
    out = torch.empty(t, k, device=scores.device, dtype=torch.int32)
    if t == 0 or k == 0:
        return out
    # measured on H100: a thousand scores per program for a few rows, a few thousand for many; the
    # candidate tile (used past rank_block candidates) small for a few rows
    if chunk is None:
        chunk = 1024 if t < 8 else 4096
    if block is None:
        block = 256 if t < 8 else 1024
    if n >= 1 << 31:
        raise ValueError(f"scores: at most 2**31 - 1 columns, got {n}")
    # per row: digit-1 and digit-2 histograms, then counters: output slots | candidates (one int64),
    # finished programs, pad (rows stay 8-byte aligned); zero before and after the call
    work = zeroed_workspace(scores.device, t * (2 * NBINS + 4)).view(t, 2 * NBINS + 4)
    pdl = pdl_supported(scores.device)
    cand_idx = torch.empty(t, max(n, 1), device=scores.device, dtype=torch.int32)
    cand_key = torch.empty_like(cand_idx)
    grid = (t, max(1, triton.cdiv(n, chunk)))
    common = (scores, scores.stride(0), n_avail, n)
    try:
        _topk_hist_kernel[grid](*common, work, work.stride(0), CHUNK=chunk, NBINS=NBINS, PDL=pdl, num_warps=num_warps)
        _topk_digit2_kernel[grid](*common, k, work, work.stride(0), CHUNK=chunk, NBINS=NBINS, PDL=pdl,
                                  num_warps=num_warps, launch_pdl=pdl)
        _topk_emit_kernel[grid](*common, k, work, work.stride(0), out, out.stride(0), cand_idx, cand_key,
                                cand_idx.stride(0), CHUNK=chunk, BLOCK=block, RANK_BLOCK=rank_block, NBINS=NBINS,
                                PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    except Exception:  # (e.g. a config that does not compile) the emit kernel would have zeroed the workspace
        work.zero_()
        raise
    return out
